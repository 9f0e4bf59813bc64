"""The Hugging Face export against transformers itself, and the tokenizer files against
tokenizers and transformers; no Ray, no download (the models are built here):
python -m pytest -q tests/test_export_hf.py
"""
import json
import os
import shutil
import stat
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from raypar import cli
from raypar import export as ex
from raypar import hf_export
from raypar.config import ConfigError, load_spec
from raypar.data.tokenizer import EOT, Tokenizer, _LEGACY_BYTE_JSON, train_bpe
from raypar.model import GPT, GPTConfig
from raypar.train import checkpoint as ckpt

from conftest import free_port

transformers = pytest.importorskip("transformers")

# A padded vocabulary (320 > the byte tokenizer's 257), as training builds it.
ROPE = dict(vocab_size=320, seq_len=24, n_layer=2, n_head=2, d_model=32)
LEARNED = dict(ROPE, pos_encoding="learned", bias=True, tie_embeddings=False, d_ff=48)
TEXT = "héllo wörld"  # 13 bytes, non-ASCII


def reference(**cfg) -> GPT:
    """A model whose every weight, biases and norms included, is away from its init value
    (zeros and ones would hide a bias or norm written to the wrong place)."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(**cfg))
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.1)
    return model.eval()


def meta_for(model: GPT, tokenizer_json: str) -> dict:
    return {"model": vars(model.cfg), "spec": {}, "tokenizer": tokenizer_json}


def _pipeline_rank(rank: int, port: int, base: str) -> None:
    """pp=2 as raypar's pipeline saves it: each rank writes only its stage's parameters
    (stage 0 the embedding and layer 0, stage 1 layer 1, the norm and the LM head)."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=2)
    try:
        model = reference(**ROPE)
        full = model.state_dict()
        mine = ("tok_emb.", "layers.0.") if rank == 0 else ("layers.1.", "norm.", "lm_head.")
        state = {"model": {k: v for k, v in full.items() if k.startswith(mine)}}
        # The byte tokenizer's older JSON: a checkpoint saved before it became a HF file.
        ckpt.write(state, {"step": 3, "tokens": 30}, meta_for(model, _LEGACY_BYTE_JSON),
                   {ckpt.rng_name(rank): ckpt.rng_state_bytes()}, dest=Path(base) / f"rank{rank}")
        dist.barrier()
        if rank == 0:  # merged as Ray Train merges the ranks' uploads
            merged = Path(base) / "run" / "checkpoints" / ckpt.dir_name(3)
            merged.mkdir(parents=True)
            for r in (0, 1):
                for f in (Path(base) / f"rank{r}").iterdir():
                    shutil.copy(f, merged / f.name)
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def pipeline_run(tmp_path_factory) -> Path:
    base = tmp_path_factory.mktemp("pp2")
    mp.spawn(_pipeline_rank, args=(free_port(), str(base)), nprocs=2, join=True)
    return base / "run"


def raypar_greedy(model: GPT, ids: list[int], n: int, vocab: int, eos: int) -> list[int]:
    """Greedy decoding over the real vocabulary, stopping after eos as transformers does."""
    x = torch.tensor([ids])
    with torch.no_grad():
        for _ in range(n):
            nxt = model(x)[:, -1, :vocab].argmax(-1, keepdim=True)
            x = torch.cat([x, nxt], dim=1)
            if nxt.item() == eos:
                break
    return x[0].tolist()


def assert_matches_transformers(model: GPT, out: Path, arch: str) -> None:
    hf = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    tok = transformers.AutoTokenizer.from_pretrained(out)
    assert type(hf).__name__ == arch
    ours = Tokenizer.byte_level()
    ids = tok(TEXT)["input_ids"]
    assert ids == ours.encode(TEXT) and tok.eos_token == EOT and tok.eos_token_id == 256
    assert hf.config.vocab_size == 257 and hf.generation_config.eos_token_id == 256
    x = torch.tensor([ids])
    with torch.no_grad():
        got = hf(x).logits
        want = model(x)[..., :257]
    assert got.dtype == torch.float32 and got.shape == want.shape
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    n = ROPE["seq_len"] - len(ids)
    generated = hf.generate(x, max_new_tokens=n, do_sample=False)[0].tolist()
    assert generated == raypar_greedy(model, ids, n, 257, 256)
    assert tok.decode(generated[len(ids):]) == ours.decode(generated[len(ids):])


def test_rope_pipeline_checkpoint_exports_to_gpt_neox(pipeline_run, capsys):
    assert cli.main(["export", str(pipeline_run)]) == 0
    out = pipeline_run / "export"
    assert f"exported: {out}" in capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == [
        "config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
        "tokenizer_config.json"]
    # Readable by the group and others under the usual umask, like any file the user makes.
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(out.stat().st_mode) == 0o777 & ~umask
    for f in out.iterdir():
        assert stat.S_IMODE(f.stat().st_mode) == 0o666 & ~umask, f
    assert json.loads((out / "config.json").read_text())["use_parallel_residual"] is False
    assert_matches_transformers(reference(**ROPE), out, "GPTNeoXForCausalLM")
    capsys.readouterr()  # (transformers' loading bar)

    # Exported again: replaced whole, nothing of the earlier one or of the work left over.
    assert cli.main(["export", str(pipeline_run)]) == 0
    assert not [p for p in pipeline_run.iterdir() if p.name.startswith(".")]

    # generate reads checkpoints and the raypar file; a HF folder is transformers' to load.
    assert cli.main(["generate", "--checkpoint", str(out), "--max-new-tokens", "2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "Hugging Face export" in err[0] and "--format raypar" in err[0]
    assert cli.main(["export", str(pipeline_run), "--format", "raypar"]) == 0
    native = pipeline_run / "export.safetensors"
    assert stat.S_IMODE(native.stat().st_mode) == 0o666 & ~umask
    assert cli.main(["generate", "--checkpoint", str(pipeline_run / "export.safetensors"),
                     "--prompt", "hé", "--max-new-tokens", "3", "--temperature", "0"]) == 0


def test_learned_bias_model_exports_to_gpt2_sharded(tmp_path):
    model = reference(**LEARNED)
    folder = tmp_path / "run" / "checkpoints" / ckpt.dir_name(1)
    tok = Tokenizer.byte_level()
    ckpt.write({"model": model.state_dict()}, {"step": 1, "tokens": 10},
               meta_for(model, tok.to_json()), {ckpt.rng_name(0): ckpt.rng_state_bytes()},
               dest=folder)
    out = ex.export(tmp_path / "run", max_shard_bytes=20_000)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 2 and files == sorted(p.name for p in out.glob("model-*.safetensors"))
    assert "lm_head.weight" in index["weight_map"]  # untied: its own head, cut to 257 rows
    assert not (out / "model.safetensors").exists()
    assert_matches_transformers(model, out, "GPT2LMHeadModel")


def test_untied_rope_model_with_biases_exports_to_gpt_neox(tmp_path):
    # Its own head goes under GPT-NeoX's name for it (embed_out), which every transformers
    # version reads; the biases are real.
    model = reference(**dict(ROPE, bias=True, tie_embeddings=False))
    folder = tmp_path / "run" / "checkpoints" / ckpt.dir_name(1)
    ckpt.write({"model": model.state_dict()}, {"step": 1, "tokens": 10},
               meta_for(model, Tokenizer.byte_level().to_json()),
               {ckpt.rng_name(0): ckpt.rng_state_bytes()}, dest=folder)
    out = ex.export(tmp_path / "run")
    config = json.loads((out / "config.json").read_text())
    assert config["tie_word_embeddings"] is False and config["attention_bias"] is True
    assert config["rotary_pct"] == 1.0
    assert_matches_transformers(model, out, "GPTNeoXForCausalLM")


def test_a_model_no_architecture_reproduces_is_one_line(pipeline_run, tmp_path, capsys,
                                                       monkeypatch):
    with pytest.raises(ConfigError, match=r"^model\.pos_encoding='alibi' maps onto no "):
        hf_export.check_exportable({"pos_encoding": "alibi"})
    # A model field the mapping does not know (one added to raypar later) is refused before
    # any consolidation, naming it; nothing is written.
    monkeypatch.setattr(hf_export, "_MAPPED_FIELDS", hf_export._MAPPED_FIELDS - {"norm_eps"})
    out = tmp_path / "new" / "hf"
    assert cli.main(["export", str(pipeline_run), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("raypar: error: model.norm_eps=1e-05 has no "
                                               "counterpart in transformers"), err
    assert not (tmp_path / "new").exists()


def test_export_out_dir_that_holds_other_files_is_refused(pipeline_run, tmp_path, capsys):
    other = tmp_path / "mine"
    other.mkdir()
    (other / "notes.txt").write_text("keep")
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    for out, fragment in ((other, "holds notes.txt"), (a_file, "is a file")):
        assert cli.main(["export", str(pipeline_run), "--out", str(out)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "--out" in err[0] and fragment in err[0], err
    assert (other / "notes.txt").read_text() == "keep" and a_file.read_text() == "x"


# ---------------------------------------------------------------- tokenizer files

SAMPLES = ["", "plain ascii", "héllo wörld\n\t日本語 😀 \ufffd", "  leading  spaces ",
           "".join(chr(c) for c in range(1, 0x800, 3))]


def test_byte_tokenizer_file_is_a_hf_tokenizer(tmp_path):
    from tokenizers import Tokenizer as HFTokenizer
    tok = Tokenizer.byte_level()
    path = tmp_path / "tokenizer.json"
    tok.save(path)
    hf = HFTokenizer.from_file(str(path))
    fast = transformers.PreTrainedTokenizerFast(tokenizer_file=str(path), eos_token=EOT)
    for text in SAMPLES:
        ids = tok.encode(text)
        assert hf.encode(text, add_special_tokens=False).ids == ids
        assert fast(text, add_special_tokens=False)["input_ids"] == ids
        assert fast.decode(ids) == text == tok.decode(ids)
    assert hf.token_to_id(EOT) == 256 and hf.get_vocab_size() == 257
    assert fast.eos_token_id == 256 and fast.convert_ids_to_tokens(256) == EOT
    assert fast.decode([104, 256, 105]) == tok.decode([104, 256, 105]) == f"h{EOT}i"
    # raypar reads its own file back as the byte kind, and the older JSON still.
    again = Tokenizer.from_file(path)
    old = Tokenizer.from_json(_LEGACY_BYTE_JSON)
    assert again.kind == old.kind == "byte"
    assert again.digest == old.digest == tok.digest, "caches and datasets keep their keys"


def test_exported_tokenizers_declare_eos(tmp_path):
    """The byte one splits the literal text of its eos as raypar's encoder does; a bpe one
    matches it, in raypar and in transformers alike."""
    bpe = train_bpe(iter(["hello world " * 20, "abc def " * 20]), 300)
    model = reference(**dict(ROPE, vocab_size=320))
    for tok in (Tokenizer.byte_level(), bpe):
        out = hf_export.write_hf(model, tok, tmp_path / tok.kind)
        fast = transformers.AutoTokenizer.from_pretrained(out)
        assert fast.eos_token == EOT and fast.eos_token_id == tok.eot_id
        for text in SAMPLES + [f"a{EOT}b"]:
            assert fast(text)["input_ids"] == tok.encode(text), (tok.kind, text)


def test_resume_accepts_a_run_saved_with_the_older_byte_json(tmp_path):
    from raypar.train.driver import _prepare_resume
    from raypar.train.rundir import RunDir
    spec = load_spec(None, ["data.tokenizer=byte"])
    rd = RunDir(tmp_path)
    rd.tokenizer.write_text(_LEGACY_BYTE_JSON)
    _prepare_resume(spec, rd, None, 320, Tokenizer.byte_level().to_json())
    rd.tokenizer.write_text(train_bpe(iter(["hello world " * 20]), 280).to_json())
    with pytest.raises(ConfigError, match="different tokenizer"):
        _prepare_resume(spec, rd, None, 320, Tokenizer.byte_level().to_json())
