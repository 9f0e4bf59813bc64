"""Checkpoint integrity, resharding and export, without a Ray cluster:
python -m pytest -q tests/test_checkpoint.py

Checkpoints are written from one process (no process group) or from two processes
(torch.multiprocessing spawn + gloo), each rank into its own directory, then merged
into one folder the way Ray Train merges the ranks' uploads.
"""
import io
import json
import logging
import pickle
import shutil
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from raypar import cli
from raypar import export as ex
from raypar.config import ConfigError, load_spec
from raypar.data.tokenizer import Tokenizer
from raypar.model import GPT, GPTConfig, param_groups
from raypar.train import checkpoint as ckpt
from raypar.train import storage

from conftest import ROOT, Payload, raypar_records, refresh_manifests

CFG = dict(vocab_size=257, seq_len=16, n_layer=2, n_head=2, d_model=32)


def model_cfg(**kw) -> GPTConfig:
    return GPTConfig(**{**CFG, **kw})


def meta_for(cfg: GPTConfig) -> dict:
    return {"model": vars(cfg), "spec": {}, "tokenizer": Tokenizer.byte_level().to_json()}


def reference_model(seed: int = 0, **kw) -> GPT:
    torch.manual_seed(seed)
    return GPT(model_cfg(**kw))


def assert_same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


def trained(seed: int = 0):
    """A model and an AdamW with state after one step."""
    model = reference_model(seed)
    opt = torch.optim.AdamW(param_groups(model, 0.1), lr=1e-2)
    x = torch.randint(0, 257, (2, 9), generator=torch.Generator().manual_seed(seed))
    torch.nn.functional.cross_entropy(model(x[:, :-1]).flatten(0, 1), x[:, 1:].flatten()).backward()
    opt.step()
    opt.zero_grad()
    return model, opt


def save_single(root: Path, step: int, seed: int = 0) -> Path:
    """One process, no process group: the whole model + optimizer state."""
    model, opt = trained(seed)
    msd, osd = get_state_dict(model, opt)
    folder = root / "checkpoints" / ckpt.dir_name(step)
    ckpt.save({"model": msd, "optim": osd}, {"step": step, "tokens": 100 * step},
              meta_for(model.cfg), {ckpt.rng_name(0): ckpt.rng_state_bytes()}, dest=folder)
    return folder


# -- one process ---------------------------------------------------------------------------

def test_save_verify_load_roundtrip(tmp_path):
    model, opt = trained(seed=1)
    msd, osd = get_state_dict(model, opt)
    torch.manual_seed(123)
    rng = ckpt.rng_state_bytes()
    result = ckpt.save({"model": msd, "optim": osd}, {"step": 7, "tokens": 70},
                       meta_for(model.cfg), {ckpt.rng_name(0): rng})
    path = Path(result.path)
    try:
        assert ckpt.verify(path) is None
        manifest = ckpt.read_manifest(path, 0)
        assert manifest["world_size"] == 1 and manifest["step"] == 7 and manifest["rank"] == 0
        assert {".metadata", "__0_0.distcp", "meta.json", "train_state.json",
                "rng-0.pt"} <= set(manifest["files"])
        assert ckpt.read_train_state(path) == {"step": 7, "tokens": 70}
        assert ckpt.read_meta(path)["model"]["d_model"] == 32

        # Model and optimizer back into fresh objects through the same DCP state dicts.
        model2 = reference_model(seed=99)
        opt2 = torch.optim.AdamW(param_groups(model2, 0.1), lr=1e-2)
        msd2, osd2 = get_state_dict(model2, opt2)
        state = {"model": msd2, "optim": osd2}
        ckpt.load(state, path)
        set_state_dict(model2, opt2, model_state_dict=state["model"],
                       optim_state_dict=state["optim"])
        assert_same_weights(model, model2)
        for p, q in zip(model.parameters(), model2.parameters()):
            for key in ("exp_avg", "exp_avg_sq", "step"):
                assert torch.equal(opt.state[p][key], opt2.state[q][key]), key

        torch.manual_seed(0)
        ckpt.restore_rng_state(ckpt.read_rng_state(path, 0))
        expected = torch.Generator().manual_seed(123)
        assert torch.equal(torch.rand(4), torch.rand(4, generator=expected))
        assert ckpt.read_rng_state(path, 3) is None
    finally:
        shutil.rmtree(path, ignore_errors=True)


def test_truncated_shard_is_skipped_with_one_warning(tmp_path, caplog):
    for step in (1, 2, 3):
        save_single(tmp_path, step, seed=step)
    bad = tmp_path / "checkpoints" / ckpt.dir_name(3)
    shard = bad / "__0_0.distcp"
    shard.write_bytes(shard.read_bytes()[:-10])
    reason = ckpt.verify(bad)
    assert "__0_0.distcp" in reason and "bytes" in reason
    assert ckpt.candidates(tmp_path) == [tmp_path / "checkpoints" / ckpt.dir_name(s)
                                         for s in (3, 2, 1)]
    with caplog.at_level(logging.WARNING, logger="raypar"):
        assert ckpt.latest_valid(tmp_path) == tmp_path / "checkpoints" / ckpt.dir_name(2)
    warnings = [r.getMessage() for r in raypar_records(caplog)]
    assert len(warnings) == 1
    assert ckpt.dir_name(3) in warnings[0] and "__0_0.distcp" in warnings[0]


def test_flipped_byte_and_missing_files_are_found(tmp_path):
    folder = save_single(tmp_path, 1)
    shard = folder / "__0_0.distcp"
    data = bytearray(shard.read_bytes())
    data[100] ^= 0xFF
    shard.write_bytes(bytes(data))  # same size: only the hash finds it
    assert "sha256" in ckpt.verify(folder)

    folder = save_single(tmp_path, 2)
    (folder / "train_state.json").unlink()
    assert "train_state.json missing" in ckpt.verify(folder)
    assert ckpt.verify(tmp_path / "nowhere") == "not a directory"


def test_missing_manifest_is_skipped(tmp_path, caplog):
    save_single(tmp_path, 4)
    crashed = save_single(tmp_path, 8)
    (crashed / "manifest-0.json").unlink()  # the save died before its manifest was written
    assert "manifest-0.json missing" in ckpt.verify(crashed)
    with caplog.at_level(logging.WARNING, logger="raypar"):
        assert ckpt.latest_valid(tmp_path) == tmp_path / "checkpoints" / ckpt.dir_name(4)
    [warning] = raypar_records(caplog)
    assert warning.levelno == logging.WARNING and ckpt.dir_name(8) in warning.getMessage()
    # The checkpoints folder itself or one step folder work as roots too.
    assert ckpt.latest_valid(tmp_path / "checkpoints") == tmp_path / "checkpoints" / ckpt.dir_name(4)
    assert ckpt.latest_valid(crashed) is None
    assert ckpt.latest_valid(tmp_path / "empty") is None


def test_pyarrow_filesystem_paths(tmp_path, monkeypatch):
    # Route plain absolute path strings through the pyarrow code path used for s3:// and gs://
    # (FileSystem.from_uri maps an absolute path to the local filesystem).
    save_single(tmp_path, 1)
    folder = save_single(tmp_path, 2)
    monkeypatch.setattr(storage, "is_uri", lambda p: isinstance(p, str))
    root = str(tmp_path)
    assert ckpt.candidates(root) == [f"{root}/checkpoints/{ckpt.dir_name(s)}" for s in (2, 1)]
    assert ckpt.verify(str(folder)) is None
    (folder / "__0_0.distcp").write_bytes(b"short")
    assert "__0_0.distcp" in ckpt.verify(str(folder))
    good = ckpt.latest_valid(root)
    assert good == f"{root}/checkpoints/{ckpt.dir_name(1)}"
    assert ckpt.read_train_state(good)["step"] == 1
    assert ckpt.read_rng_state(good, 0) is not None
    model = reference_model(seed=5)
    ckpt.load_model_state(good, model)  # through a local copy
    assert_same_weights(model, trained(seed=0)[0])
    assert ckpt.verify(str(tmp_path / "nowhere")) == "not a directory"


def test_a_flipped_byte_passes_the_size_check_and_fails_the_load_naming_the_file(tmp_path):
    """A start checks sizes only; the bytes a load reads are hashed per DCP item against
    the hashes taken as the save streamed them out."""
    folder = save_single(tmp_path, 1)
    entry = ckpt.read_manifest(folder, 0)["files"]["__0_0.distcp"]
    assert entry["items"] and all(len(h) == 64 for _, _, h in entry["items"])
    assert sum(n for _, n, _ in entry["items"]) <= entry["size"]
    shard = folder / "__0_0.distcp"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    assert ckpt.verify(folder, hashes=False) is None
    assert ckpt.latest_valid(tmp_path, hashes=False) == folder
    assert "sha256" in ckpt.verify(folder)
    model, opt = trained(0)
    msd, osd = get_state_dict(model, opt)
    with pytest.raises(ckpt.CorruptCheckpoint, match=r"__0_0\.distcp sha256 mismatch at bytes"):
        ckpt.load({"model": msd, "optim": osd}, folder)


def _empty_like_saved(metadata, fqns):
    return {fqn.split(".", 1)[1]: torch.empty(tuple(metadata.state_dict_metadata[fqn].size))
            for fqn in fqns}


def test_a_load_reads_only_the_items_it_needs_once(tmp_path):
    """No folder copy: a load reads .metadata and exactly the byte ranges of the entries it
    asks for, one ranged read each, even when two stage modules ask for the same one."""
    from raypar.train.safe_dcp import read_metadata
    folder = save_single(tmp_path, 1)
    metadata = read_metadata(folder)
    length = {i.fqn: s.length for i, s in metadata.storage_data.items()}
    meta_size = (folder / ".metadata").stat().st_size
    total = sum(p.stat().st_size for p in folder.iterdir())

    wanted = ["model.tok_emb.weight", "model.layers.0.attn.wq.weight"]
    assert set(wanted) <= set(length), sorted(length)
    state = {"model": _empty_like_saved(metadata, wanted)}
    stats = ckpt.load(state, folder)
    assert stats.bytes == meta_size + sum(length[f] for f in wanted) < total / 4
    assert stats.reads == 1 + len(wanted) and stats.files == {".metadata", "__0_0.distcp"}
    ref = trained(0)[0].state_dict()
    for fqn in wanted:
        assert torch.equal(state["model"][fqn.split(".", 1)[1]], ref[fqn.split(".", 1)[1]])

    # Two stage modules, both holding the embedding (a tied copy): its bytes are read once.
    source = ckpt.Source(folder)
    first = {"model": _empty_like_saved(metadata, wanted)}
    second = {"model": _empty_like_saved(metadata, wanted[:1])}
    source.load([first, second])
    assert source.stats.bytes == stats.bytes
    assert torch.equal(second["model"]["tok_emb.weight"], ref["tok_emb.weight"])


def test_check_compatible_names_every_field():
    meta = {"model": vars(model_cfg(d_model=64, n_layer=4))}
    with pytest.raises(ValueError) as e:
        ckpt.check_compatible(meta, vars(model_cfg()))
    msg = str(e.value)
    assert "checkpoint has model.d_model=64, this run has 32" in msg
    assert "checkpoint has model.n_layer=4, this run has 2" in msg
    assert "vocab_size" not in msg
    ckpt.check_compatible(meta, vars(model_cfg(d_model=64, n_layer=4)))
    # A field the checkpoint predates counts as its default.
    old = {"model": {k: v for k, v in vars(model_cfg()).items() if k != "norm_eps"}}
    ckpt.check_compatible(old, vars(model_cfg()))
    with pytest.raises(ValueError, match="checkpoint has model.norm_eps=1e-05, this run has 0.001"):
        ckpt.check_compatible(old, vars(model_cfg(norm_eps=1e-3)))


class _Marker:
    """Unpickling this would create a file: the test checks that it never does."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (Path.touch, (Path(self.path),))


def test_rng_files_load_weights_only(tmp_path):
    folder = save_single(tmp_path, 1)
    marker = tmp_path / "pwned"
    torch.save({"cpu": torch.get_rng_state(), "x": _Marker(marker)}, folder / "rng-0.pt")
    with pytest.raises(pickle.UnpicklingError):
        ckpt.read_rng_state(folder, 0)
    assert not marker.exists()


def test_tied_weight_stored_once_still_loads(tmp_path):
    ref = reference_model(seed=2)
    state = {k: v for k, v in ref.state_dict().items() if k != "lm_head.weight"}
    folder = tmp_path / ckpt.dir_name(1)
    ckpt.write({"model": state}, {"step": 1}, meta_for(ref.cfg), dest=folder)
    assert ckpt.verify(folder) is None
    model = reference_model(seed=3)
    ckpt.load_model_state(folder, model)
    assert_same_weights(model, ref)
    assert model.lm_head.weight is model.tok_emb.weight


def test_save_rejects_reserved_names_and_used_dirs(tmp_path):
    model = reference_model()
    with pytest.raises(ValueError, match="reserved"):
        ckpt.save({"model": model.state_dict()}, {"step": 1}, {}, {"meta.json": b"{}"},
                  dest=tmp_path / "a")
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "x").write_text("x")
    with pytest.raises(ValueError, match="not empty"):
        ckpt.save({"model": model.state_dict()}, {"step": 1}, {}, dest=tmp_path / "b")


# -- two processes: DTensor shards, merged like Ray merges the ranks' uploads --------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _placement(name: str, t: torch.Tensor, layout: int):
    """Layout 0 and 1 shard the same tensors along different dims (or not at all)."""
    from torch.distributed.tensor import Replicate, Shard

    if t.ndim == 2:
        return [Shard(layout)] if (sum(map(ord, name)) % 2 == 0) == (layout == 0) else [Shard(1 - layout)]
    return [Shard(0)] if layout == 1 and t.shape[0] % 2 == 0 else [Replicate()]


def _two_rank_worker(rank: int, port: int, base: str) -> None:
    from torch.distributed.tensor import distribute_tensor, init_device_mesh

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=2)
    try:
        mesh = init_device_mesh("cpu", (2,))
        ref = reference_model(seed=0)
        full = ref.state_dict()
        # src_data_rank=None: every rank holds the full tensor already; split locally.
        state = {"model": {k: distribute_tensor(v, mesh, _placement(k, v, 0), src_data_rank=None)
                           for k, v in full.items()}}
        base_dir = Path(base)
        # write() is save() without wrapping the folder in a ray.train.Checkpoint (whose
        # import would cost each spawned process seconds).
        ckpt.write(state, {"step": 5, "tokens": 500}, meta_for(ref.cfg),
                  {ckpt.rng_name(rank): ckpt.rng_state_bytes()},
                  dest=base_dir / f"rank{rank}")
        dist.barrier()
        merged = base_dir / "run" / "checkpoints" / ckpt.dir_name(5)
        if rank == 0:  # what Ray Train does with every rank's upload
            merged.mkdir(parents=True)
            for r in (0, 1):
                for f in (base_dir / f"rank{r}").iterdir():
                    shutil.copy(f, merged / f.name)
        dist.barrier()
        # Load back into the other layout: DCP reshards by global names.
        target = {"model": {k: distribute_tensor(torch.zeros_like(v), mesh, _placement(k, v, 1),
                                                 src_data_rank=None)
                            for k, v in full.items()}}
        ckpt.load(target, merged)
        for k, v in target["model"].items():
            assert v.placements == tuple(_placement(k, full[k], 1))
            assert torch.equal(v.full_tensor(), full[k]), k
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_rank_run(tmp_path_factory) -> Path:
    """A run directory holding one checkpoint saved by 2 ranks with DTensor-sharded weights."""
    base = tmp_path_factory.mktemp("two_rank")
    mp.spawn(_two_rank_worker, args=(_free_port(), str(base)), nprocs=2, join=True)
    return base / "run"


def test_two_rank_checkpoint_verifies_and_reshards_to_one_process(two_rank_run, tmp_path):
    folder = ckpt.latest_valid(two_rank_run)
    assert folder == two_rank_run / "checkpoints" / ckpt.dir_name(5)
    m0, m1 = ckpt.read_manifest(folder, 0), ckpt.read_manifest(folder, 1)
    assert m0["world_size"] == 2 and m0["step"] == 5 and m1["rank"] == 1
    assert "__1_0.distcp" in m1["files"] and ".metadata" in m0["files"]
    assert ckpt.read_rng_state(folder, 1)["cpu"].dtype == torch.uint8

    plain = reference_model(seed=42)
    ckpt.load_model_state(folder, plain)
    assert_same_weights(plain, reference_model(seed=0))

    # A rank's manifest lost in the upload: the checkpoint is incomplete.
    broken = tmp_path / ckpt.dir_name(5)
    shutil.copytree(folder, broken)
    (broken / "manifest-1.json").unlink()
    assert "manifest-1.json missing" in ckpt.verify(broken)
    shutil.copy(folder / "manifest-1.json", broken / "manifest-1.json")
    (broken / "__1_0.distcp").unlink()
    assert "__1_0.distcp missing" in ckpt.verify(broken)


def test_export_then_generate(two_rank_run, tmp_path, capsys):
    out = ex.export(two_rank_run, format="raypar")
    assert out == two_rank_run / "export.safetensors"
    model, meta = ex.load_exported(out)
    reference = reference_model(seed=0)
    assert_same_weights(model, reference)
    assert model.lm_head.weight is model.tok_emb.weight
    assert meta["model"] == vars(reference.cfg) and meta["train_state"]["step"] == 5

    tok = Tokenizer.from_json(meta["tokenizer"])
    prompt = tok.encode("ab")
    ids = reference.generate(torch.tensor([prompt]), 20, temperature=0)[0].tolist()
    assert len(ids) == len(prompt) + 20
    for source in (["--checkpoint", str(out)], ["--run-dir", str(two_rank_run)],
                   ["--checkpoint", str(ckpt.latest_valid(two_rank_run))]):
        assert cli.main(["generate", *source, "--prompt", "ab", "--max-new-tokens", "20",
                         "--temperature", "0"]) == 0
        assert capsys.readouterr().out == tok.decode(ids) + "\n"

    # Through the CLI, with --out.
    other = tmp_path / "m.safetensors"
    assert cli.main(["export", str(two_rank_run), "--format", "raypar", "--out", str(other)]) == 0
    assert str(other) in capsys.readouterr().out
    assert_same_weights(ex.load_exported(other)[0], reference)


def _one_line_error(capsys, *fragments) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("raypar: error: "), err
    for f in fragments:
        assert f in err[0], err[0]
    return err[0]


def test_mismatched_config_is_one_line_exit_2(two_rank_run, tmp_path, capsys):
    # A run directory whose config describes another model (tiny.yaml: seq_len 32, vocab 320).
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text(load_spec(ROOT / "jobs" / "configs" / "tiny.yaml").to_yaml())
    Tokenizer.byte_level().save(run / "tokenizer.json")
    folder = ckpt.latest_valid(two_rank_run)
    assert cli.main(["generate", "--run-dir", str(run), "--checkpoint", str(folder),
                     "--max-new-tokens", "2"]) == 2
    _one_line_error(capsys, "checkpoint has model.seq_len=16, this run has 32",
                    "model.vocab_size=257")
    assert cli.main(["export", str(run), "--checkpoint", str(folder)]) == 2
    _one_line_error(capsys, "model.seq_len")

    # An exported file whose tensors do not fit its recorded config.
    model = reference_model(seed=0)
    bad = tmp_path / "bad.safetensors"
    lying = meta_for(model.cfg)
    ex.save_safetensors(model, lying, bad)
    from safetensors.torch import load_file, save_file
    tensors = load_file(str(bad))
    from safetensors import safe_open
    with safe_open(str(bad), framework="pt") as f:
        metadata = f.metadata()
    metadata[ex.KEY_MODEL] = json.dumps(vars(model_cfg(d_model=64)))
    save_file(tensors, str(bad), metadata=metadata)
    assert cli.main(["generate", "--checkpoint", str(bad), "--max-new-tokens", "2"]) == 2
    _one_line_error(capsys, "tok_emb.weight has shape (257, 32), config needs (257, 64)")

    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    assert cli.main(["generate", "--checkpoint", str(tmp_path / "junk.safetensors")]) == 2
    _one_line_error(capsys, "not a readable safetensors file")

    # A checkpoint folder that fails verification.
    broken = tmp_path / ckpt.dir_name(5)
    shutil.copytree(folder, broken)
    (broken / "manifest-0.json").unlink()
    assert cli.main(["generate", "--checkpoint", str(broken)]) == 2
    _one_line_error(capsys, "not a valid checkpoint", "manifest-0.json missing")
    assert cli.main(["generate"]) == 2
    _one_line_error(capsys, "--run-dir or --checkpoint")


def test_consolidate_rejects_meta_that_does_not_fit(tmp_path):
    folder = save_single(tmp_path, 1)
    meta = ckpt.read_meta(folder)
    meta["model"]["d_model"] = 64
    (folder / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(ConfigError, match="do not fit"):
        ex.consolidate(folder)


# -- a forged checkpoint cannot run code ------------------------------------------------------

def test_forged_metadata_is_refused_in_generate_and_export(tmp_path, capsys):
    folder = save_single(tmp_path, 3)
    marker = tmp_path / "pwned"
    (folder / ".metadata").write_bytes(pickle.dumps(Payload(marker)))
    refresh_manifests(folder, ".metadata")
    assert cli.main(["generate", "--run-dir", str(tmp_path), "--max-new-tokens", "2"]) == 2
    _one_line_error(capsys, ".metadata refused", "os")
    new_dir = tmp_path / "new" / "sub"
    assert cli.main(["export", str(tmp_path), "--format", "raypar",
                     "--out", str(new_dir / "m.safetensors")]) == 2
    _one_line_error(capsys, str(folder), ".metadata refused")
    assert not (tmp_path / "new").exists(), "a failed export leaves no directories behind"
    with pytest.raises(ConfigError, match=r"\.metadata refused"):
        ckpt.load({"model": {}}, folder)
    assert not marker.exists(), "the payload ran"
    assert not (tmp_path / "m.safetensors").exists()


def test_forged_optimizer_entry_is_refused(tmp_path):
    """A non-tensor entry (an optimizer param_groups value) replaced by a pickle payload,
    with DCP's metadata pointed at it: DCP itself would torch.load it with weights_only=False."""
    import io as _io
    from raypar.train.safe_dcp import read_metadata
    folder = save_single(tmp_path, 3)
    marker = tmp_path / "pwned"
    metadata = read_metadata(folder)
    [(index, info)] = [(i, s) for i, s in metadata.storage_data.items()
                       if i.fqn == "optim.param_groups.0.lr"]
    buf = _io.BytesIO()
    torch.save(Payload(marker), buf)
    shard = folder / info.relative_path
    offset = shard.stat().st_size
    with open(shard, "ab") as f:
        f.write(buf.getvalue())
    info.offset, info.length = offset, len(buf.getvalue())
    (folder / ".metadata").write_bytes(pickle.dumps(metadata))
    refresh_manifests(folder, ".metadata", info.relative_path)
    model, opt = trained(0)
    msd, osd = get_state_dict(model, opt)
    with pytest.raises(ConfigError, match=r"entry optim\.param_groups\.0\.lr refused"):
        ckpt.load({"model": msd, "optim": osd}, folder)
    assert not marker.exists(), "the payload ran"
    # The same checkpoint, unforged, loads model and optimizer.
    clean = save_single(tmp_path / "clean", 3)
    ckpt.load({"model": msd, "optim": osd}, clean)


def test_export_out_that_cannot_be_written_is_one_line_and_leaves_nothing(tmp_path, capsys):
    save_single(tmp_path, 2)
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    a_dir = tmp_path / "a-dir"
    a_dir.mkdir()
    for out in (blocker / "m.safetensors", a_dir, Path("/proc/raypar/m.safetensors")):
        assert cli.main(["export", str(tmp_path), "--format", "raypar", "--out", str(out)]) == 2
        _one_line_error(capsys, "--out", str(out))
    assert list(a_dir.iterdir()) == [] and blocker.read_text() == "x"
    assert not list(tmp_path.glob(".*.tmp")) and not list(tmp_path.glob(".*.probe"))


def test_forged_metadata_cannot_touch_allowed_classes_or_point_outside(tmp_path):
    from torch.distributed.checkpoint.metadata import Metadata

    from raypar.train import safe_dcp
    folder = save_single(tmp_path, 3)
    good = (folder / ".metadata").read_bytes()
    # BUILD applied to an admitted class itself: would set Metadata.injected for the process.
    forged = (b"\x80\x02ctorch.distributed.checkpoint.metadata\nMetadata\n"
              b"N}X\x08\x00\x00\x00injectedK\x01s\x86b.")
    (folder / ".metadata").write_bytes(forged)
    refresh_manifests(folder, ".metadata")
    with pytest.raises(ConfigError, match="refused: it sets the state of a type"):
        ckpt.load({"model": {}}, folder)
    assert not hasattr(Metadata, "injected")
    # An entry pointing outside the checkpoint (a file the user can read elsewhere).
    (folder / ".metadata").write_bytes(good)
    refresh_manifests(folder, ".metadata")
    metadata = safe_dcp.read_metadata(folder)
    info = next(iter(metadata.storage_data.values()))
    info.relative_path = "../../secret.distcp"
    (folder / ".metadata").write_bytes(pickle.dumps(metadata))
    refresh_manifests(folder, ".metadata")
    with pytest.raises(ConfigError, match="points outside the checkpoint"):
        ckpt.load({"model": {}}, folder)
    # Beyond the end of a listed file.
    info.relative_path, info.length = "__0_0.distcp", 10**12
    (folder / ".metadata").write_bytes(pickle.dumps(metadata))
    refresh_manifests(folder, ".metadata")
    with pytest.raises(ConfigError, match="which no manifest lists"):
        ckpt.load({"model": {}}, folder)
    # Paths as Python 3.13 pickles them come back as text, no pathlib class handed out.
    unpickler = safe_dcp._MetadataUnpickler(io.BytesIO(b""))
    assert unpickler.find_class("pathlib._local", "PosixPath")("/a", "b") == "/a/b"
