"""model.init_from: starting a run from a local Hugging Face model, against transformers
itself; nothing is downloaded (the models are built here, random, and saved with
save_pretrained). The unit tests need no Ray; the last one trains under dp=2 x pp=2:
python -m pytest -q tests/test_hf_import.py
"""
import json
import math
from pathlib import Path

import pytest
import torch

from raypar.config import load_spec, model_config
from raypar.data.tokenizer import EOT, Tokenizer
from raypar.hf_import import load_shards, model_vocab
from raypar.model import GPT

from test_bad_inputs import assert_one_line, raypar

transformers = pytest.importorskip("transformers")

ROPE_PARAMS = {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 1.0}
# GPT-NeoX as raypar computes it: untied head (embed_out), attention biases.
NEOX = dict(vocab_size=320, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
            intermediate_size=48, hidden_act="gelu", use_parallel_residual=False,
            rope_parameters=ROPE_PARAMS, tie_word_embeddings=False,
            max_position_embeddings=64)
# GPT-2 with exact GELU, tied, a vocabulary that is no multiple of 64 and more positions
# than the run uses.
GPT2 = dict(vocab_size=301, n_embd=32, n_layer=2, n_head=4, n_inner=40, n_positions=48,
            activation_function="gelu")


def save_model(path: Path, arch: str, scale: float = 0.3, **changes) -> Path:
    """A random transformers model and a tokenizer (raypar's byte one as a HF file),
    saved as save_pretrained writes them. Every weight is moved away from its init value
    (zero biases and unit norms would hide one read from the wrong place)."""
    if arch == "neox":
        model = transformers.GPTNeoXForCausalLM(transformers.GPTNeoXConfig(**{**NEOX, **changes}))
    else:
        model = transformers.GPT2LMHeadModel(transformers.GPT2Config(**{**GPT2, **changes}))
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * scale)
    model.save_pretrained(path)
    tok = transformers.PreTrainedTokenizerFast(tokenizer_object=Tokenizer.byte_level().to_hf(),
                                               eos_token=EOT)
    tok.save_pretrained(path)
    return path


def hf_model(path: Path):
    return transformers.AutoModelForCausalLM.from_pretrained(path).eval()


def raypar_model(spec) -> GPT:
    """The GPT the run builds for spec, loaded as each rank loads its shards."""
    model = GPT(model_config(spec, model_vocab(spec, 257)))
    load_shards(model, spec.model.init_from)
    return model.eval()


@pytest.mark.parametrize("arch", ["neox", "gpt2", "neox-tied-no-attention-bias"])
def test_loaded_model_computes_transformers_logits(tmp_path, arch):
    changes = {"tie_word_embeddings": True, "attention_bias": False} \
        if arch.startswith("neox-") else {}
    path = save_model(tmp_path / "hf", arch.split("-")[0], **changes)
    spec = load_spec(None, [f"model.init_from={path}", "data.seq_len=24", "parallel.tp=1"])
    want = {"neox": dict(n_layer=2, n_head=2, d_model=32, d_ff=48, bias=True,
                         tie_embeddings=not not changes, pos_encoding="rope"),
            "gpt2": dict(n_layer=2, n_head=4, d_model=32, d_ff=40, bias=True,
                         tie_embeddings=True, pos_encoding="learned")}[arch.split("-")[0]]
    assert {k: getattr(spec.model, k) for k in want} == want
    assert spec.data.tokenizer == str(path.resolve() / "tokenizer.json")
    model, ref = raypar_model(spec), hf_model(path)
    rows = NEOX["vocab_size"] if arch.startswith("neox") else GPT2["vocab_size"]
    assert model.cfg.vocab_size == rows  # the checkpoint's rows, not the tokenizer's padded
    x = torch.randint(0, 257, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours, theirs = model(x), ref(x).logits
    assert theirs.abs().max() > 1.0  # logits far from uniform: a wrong weight shows
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)


def test_vocabulary_rounded_up_to_tp_has_zero_rows(tmp_path):
    path = save_model(tmp_path / "hf", "gpt2")
    spec = load_spec(None, [f"model.init_from={path}", "data.seq_len=24", "parallel.tp=2",
                            "parallel.dp=1"])
    assert model_vocab(spec, 257) == 302  # 301 rows, a multiple of tp=2
    model, ref = raypar_model(spec), hf_model(path)
    assert torch.equal(model.tok_emb.weight[301:], torch.zeros(1, 32))
    x = torch.randint(0, 257, (1, 24), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(model(x)[..., :301], ref(x).logits, atol=1e-5, rtol=0)
    small = save_model(tmp_path / "small", "gpt2", vocab_size=200)
    assert_one_line(raypar("train", "--set", f"model.init_from={small}", "--set",
                           "data.seq_len=24"), "tokenizer has 257 ids, more than the 200 rows")


@pytest.mark.parametrize("arch,changes,fragment", [
    ("neox", {"rope_parameters": {**ROPE_PARAMS, "partial_rotary_factor": 0.25}},
     "GPT-NeoX with partial_rotary_factor=0.25 maps onto no raypar model"),
    ("neox", {"use_parallel_residual": True}, "use_parallel_residual=True"),
    ("neox", {"hidden_act": "gelu_new"}, "hidden_act='gelu_new'"),
    ("gpt2", {"activation_function": "gelu_new"},
     "GPT-2 with activation_function='gelu_new' maps onto no raypar model"),
])
def test_configs_raypar_cannot_reproduce_are_one_line(tmp_path, arch, changes, fragment):
    path = save_model(tmp_path / "hf", arch, **changes)
    assert_one_line(raypar("plan", "--set", f"model.init_from={path}"), "model.init_from",
                    fragment)


def test_conflicts_and_missing_files_are_one_line(tmp_path):
    path = save_model(tmp_path / "hf", "neox")
    # Set to what the checkpoint has: accepted (the run's own config.yaml does this).
    spec = load_spec(None, [f"model.init_from={path}", "model.n_layer=2", "model.d_ff=48",
                            f"data.tokenizer={path}/tokenizer.json"])
    assert spec.model.n_layer == 2
    assert_one_line(raypar("train", "--set", f"model.init_from={path}", "--set",
                           "model.n_layer=4"),
                    "model.n_layer=4 conflicts with model.init_from=", "n_layer=2")
    assert_one_line(raypar("plan", "--set", f"model.init_from={path}", "--set",
                           "model.tie_embeddings=true"), "model.tie_embeddings=True conflicts")
    assert_one_line(raypar("plan", "--set", f"model.init_from={path}", "--set",
                           "data.tokenizer=byte"),
                    "data.tokenizer='byte' conflicts with model.init_from=", "tokenizer.json")
    assert_one_line(raypar("plan", "--set", f"model.init_from={tmp_path}/none"),
                    "model.init_from: no such directory")
    (path / "tokenizer.json").rename(tmp_path / "tok.json")
    assert_one_line(raypar("plan", "--set", f"model.init_from={path}"), "holds no tokenizer.json")
    (tmp_path / "tok.json").rename(path / "tokenizer.json")
    (path / "model.safetensors").unlink()
    assert_one_line(raypar("plan", "--set", f"model.init_from={path}"),
                    "holds no model.safetensors")
    gpt2 = save_model(tmp_path / "gpt2", "gpt2")
    assert_one_line(raypar("plan", "--set", f"model.init_from={gpt2}", "--set", "data.seq_len=64"),
                    "data.seq_len=64 exceeds the 48 learned positions")


# -- a real run: dp=2 x pp=2 through Ray ------------------------------------------------------

@pytest.mark.ray
def test_run_starts_from_the_checkpoint_under_dp2_pp2(ray_local, small_corpus, cache_dir,
                                                     tmp_path):
    from mlflow.tracking import MlflowClient

    from raypar.data import prepare_corpus
    from raypar.train.driver import run
    from raypar.train.rundir import read_metrics
    path = save_model(tmp_path / "hf", "neox")
    spec = load_spec(None, [
        f"model.init_from={path}", f"data.path={small_corpus}", f"data.cache_dir={cache_dir}",
        "data.seq_len=32", "data.val_fraction=0.1", "parallel.dp=2", "parallel.pp=2",
        "train.steps=2", "train.global_batch=8", "train.micro_batch=2", "train.eval_every=0",
        "train.log_blocks=true"])
    summary = run(spec, tmp_path / "run", progress=False)
    rows = read_metrics(tmp_path / "run")[0]
    assert [r["step"] for r in rows] == [1, 2]

    # Step 1's loss is computed on step 0's weights: transformers' loss on the same blocks.
    blocks = torch.from_numpy(prepare_corpus(spec.data, cache_dir).train[rows[0]["blocks"]]
                              .astype("int64"))
    with torch.no_grad():
        logits = hf_model(path)(blocks[:, :-1]).logits
    want = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                             blocks[:, 1:].reshape(-1)).item()
    assert want > math.log(320) + 0.5  # far from uniform: the weights are not raypar's own
    assert rows[0]["loss"] == pytest.approx(want, rel=1e-5)

    recorded = load_spec(tmp_path / "run" / "config.yaml")
    assert recorded.model.init_from == str(path.resolve())
    assert recorded.data.tokenizer == str(path.resolve() / "tokenizer.json")
    params = MlflowClient(summary["mlflow_uri"]).get_run(summary["mlflow_run_id"]).data.params
    assert params["model.init_from"] == str(path.resolve())
    meta = json.loads(next((tmp_path / "run" / "checkpoints").glob("step_*/meta.json"))
                      .read_text())
    assert "init_from" not in meta["model"]  # the model's config is the architecture alone

    # --resume continues from the run's checkpoint, not from the Hugging Face weights:
    # zeroed there now (a model of zeros would score log(320) exactly). The HF directory
    # stays needed: the run's config and tokenizer are read from it again.
    from safetensors.torch import load_file, save_file
    weights = load_file(path / "model.safetensors")
    save_file({k: torch.zeros_like(v) for k, v in weights.items()}, path / "model.safetensors",
              metadata={"format": "pt"})
    # (In one process: a resume may take any layout, and this one starts fastest.)
    run(load_spec(tmp_path / "run" / "config.yaml", ["train.steps=3", "parallel.dp=1",
                                                      "parallel.pp=1"]), tmp_path / "run",
        progress=False, resume=True)
    rows = read_metrics(tmp_path / "run")[0]
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert abs(rows[2]["loss"] - rows[1]["loss"]) < 0.5 < abs(rows[2]["loss"] - math.log(320))

    # And it exports back to transformers (the vocabulary cut to the tokenizer's 257 ids).
    assert raypar("export", str(tmp_path / "run")).returncode == 0
    exported = hf_model(tmp_path / "run" / "export")
    assert type(exported).__name__ == "GPTNeoXForCausalLM"
    assert exported.config.vocab_size == 257 and exported.config.hidden_size == 32
