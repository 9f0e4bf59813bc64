"""Bad inputs that once ended in a traceback, a hang or a misleading message (issue 13,
points 7 and 8): each is now one line naming the field, flag or file, exit 2, and leaves
nothing behind. No test here starts Ray: the corpus pipeline runs on an in-process
stand-in for its Ray Data stage."""
import contextlib
import io
import json
import os
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pyarrow as pa
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from raypar import cli
from raypar import cluster
from raypar import export as ex
from raypar.config import DataConfig
from raypar.data import pipeline
from raypar.data.corpus import document_names, file_stats, resolve_sources
from raypar.data.decode import decode_batch
from raypar.data.tokenizer import Tokenizer, train_bpe
from raypar.errors import ConfigError
from raypar.model import GPT, GPTConfig

from conftest import ROOT

TINY = str(ROOT / "jobs" / "configs" / "tiny.yaml")


def raypar(*args):
    """`raypar ARGS` in this process: its exit code and stderr."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli.main(list(args))
    return SimpleNamespace(returncode=code, stderr=err.getvalue())


def assert_one_line(proc, *fragments):
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("raypar: error: "), proc.stderr
    for f in fragments:
        assert f in lines[0], lines[0]


def write_corpus(folder: Path, n: int = 12, words: int = 120) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    vocab = ["alpha", "beta", "gamma", "delta", "epsilon"]
    for i in range(n):
        (folder / f"d{i}.txt").write_text(" ".join(rng.choice(vocab, words)))
    return folder


# -- a: corpus entries that are not readable files --------------------------------------------

def _broken(kind: str, folder: Path) -> Path:
    bad = folder / "x.txt"
    if kind == "loop":
        bad.symlink_to("x.txt")
    elif kind == "dangling":
        bad.symlink_to(folder / "gone.txt")
    else:
        os.mkfifo(bad)  # opening it would block until a writer came
    return bad


@pytest.mark.parametrize("kind, what", [("loop", "symlink loop"),
                                        ("dangling", "dangling symlink"), ("fifo", "a FIFO")])
def test_corpus_entry_that_is_not_a_file(kind, what, tmp_path):
    corpus = write_corpus(tmp_path / "corpus", n=2)
    bad = _broken(kind, corpus)
    run = tmp_path / "run"
    for path in (corpus, bad):  # the directory that holds it, and the entry itself
        proc = raypar("train", "--config", TINY, "--set", f"data.path={path}",
                      "--set", f"data.cache_dir={tmp_path / 'cache'}", "--run-dir", str(run))
        assert_one_line(proc, "data.path", str(bad), what)
    # A glob matching it says the same (it used to drop it silently).
    with pytest.raises(ConfigError, match=what):
        resolve_sources(str(corpus / "*.txt"), "auto")
    assert not run.exists() and not (tmp_path / "cache").exists()


def test_glob_skips_matched_directories(tmp_path):
    corpus = write_corpus(tmp_path / "corpus", n=2)
    (corpus / "sub.txt").mkdir()  # a directory whose name matches
    found = resolve_sources(str(corpus / "**"), "auto")
    assert [Path(p).name for p in found] == ["d0.txt", "d1.txt"]


def test_file_stats_refuses_a_file_replaced_since_listing(tmp_path):
    corpus = write_corpus(tmp_path / "corpus", n=2)
    sources = resolve_sources(str(corpus), "auto")
    Path(sources[0]).unlink()
    os.mkfifo(sources[0])
    with pytest.raises(ConfigError, match=r"^data\.path: .*d0\.txt is a FIFO"):
        file_stats(sources)


# -- b: a HOME where Ray cannot write its token -----------------------------------------------

@pytest.fixture
def no_ray_token(monkeypatch):
    for name in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
        monkeypatch.delenv(name, raising=False)


def test_unwritable_home_is_refused_before_ray_starts(tmp_path, monkeypatch, no_ray_token):
    a_file = tmp_path / "home-is-a-file"
    a_file.write_text("")
    # A file as HOME and /proc block root too (chmod does not).
    for home in (a_file, Path("/proc")):
        monkeypatch.setenv("HOME", str(home))
        with pytest.raises(ConfigError, match=rf"^HOME: cannot write {home}/\.ray/auth_token"):
            cluster.check_home_writable()
        monkeypatch.setattr(cluster.ray, "is_initialized", lambda: False)
        with pytest.raises(ConfigError, match="^HOME: .*set HOME to a writable directory"):
            cluster.connect(None, 1)  # the conftest makes ray.init itself fail the test
    # A token Ray is told about elsewhere needs no HOME at all.
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(a_file))
    cluster.check_home_writable()


def test_writable_home_passes_and_keeps_no_probe(tmp_path, monkeypatch, no_ray_token):
    monkeypatch.setenv("HOME", str(tmp_path))
    cluster.check_home_writable()
    assert list((tmp_path / ".ray").iterdir()) == []
    # A token already there: nothing to write, so a read-only HOME would do.
    (tmp_path / ".ray" / "auth_token").write_text("t" * 32)
    monkeypatch.setattr(os, "makedirs", lambda *a, **k: pytest.fail("wrote under HOME"))
    cluster.check_home_writable()


# -- c: data.cache_dir, without Ray -----------------------------------------------------------

class LocalDataset:
    """Ray Data's map_batches / iter_batches, run in this process on whole tables."""

    def __init__(self, tables):
        self.tables = tables

    def map_batches(self, fn, batch_format, fn_kwargs):
        return LocalDataset([fn(t, **fn_kwargs) for t in self.tables])

    def iter_batches(self, batch_size, batch_format):
        return iter(self.tables)


@pytest.fixture
def local_data(monkeypatch):
    """prepare_corpus with its decode stage run in process; counts the stage's uses."""
    calls = []

    def documents(sources, fmt, cfg):
        calls.append(sources)
        files = {p: (i, n, p) for i, (p, n) in enumerate(zip(sources, document_names(sources)))}
        batch = pa.table({"bytes": [Path(p).read_bytes() for p in sources], "path": sources})
        return LocalDataset([decode_batch(batch, fmt, cfg.text_column, cfg.val_fraction, files)])

    monkeypatch.setattr(pipeline, "_documents", documents)
    return calls


def _unwritable(tmp_path: Path) -> list[Path]:
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    return [blocker / "cache", Path("/proc/raypar-cache")]


def test_unwritable_cache_dir_is_refused_before_any_work(tmp_path, local_data):
    corpus = write_corpus(tmp_path / "corpus")
    for cache in _unwritable(tmp_path):
        for tokenizer in ("byte", "bpe"):
            cfg = DataConfig(path=str(corpus), cache_dir=str(cache), tokenizer=tokenizer,
                             vocab_size=300, seq_len=16)
            with pytest.raises(ConfigError, match=rf"^data\.cache_dir: cannot write {cache} "):
                pipeline.check_cache_dir(cfg)
            with pytest.raises(ConfigError, match=r"^data\.cache_dir: .*writable directory$"):
                pipeline.prepare_corpus(cfg)
    assert local_data == [], "the corpus was read although its result could not be kept"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file", "corpus"]


def test_default_cache_dir_names_its_default(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", "/proc")
    cfg = DataConfig(path=str(write_corpus(tmp_path / "corpus")), seq_len=16)
    with pytest.raises(ConfigError, match=r"^data\.cache_dir: cannot write the default "
                                          r"/proc/\.cache/raypar .*or HOME"):
        pipeline.check_cache_dir(cfg)


def test_read_only_cache_that_holds_the_corpus_still_works(tmp_path, local_data, monkeypatch):
    corpus, cache = write_corpus(tmp_path / "corpus"), tmp_path / "cache"
    cfgs = [DataConfig(path=str(corpus), cache_dir=str(cache), tokenizer=tokenizer,
                       vocab_size=300, seq_len=16, val_fraction=0.0)
            for tokenizer in ("byte", "bpe")]
    first = [pipeline.prepare_corpus(cfg) for cfg in cfgs]
    assert not any(c.from_cache for c in first)
    assert not list(cache.rglob(".raypar-probe-*")), "the probe is removed"

    # From here on every write into the cache fails, as on a read-only mount (chmod alone
    # does not stop root, so the probe is made to fail too).
    def read_only(folder):
        raise OSError(30, "Read-only file system")
    monkeypatch.setattr(pipeline, "_probe_dir", read_only)
    for p in [cache, *cache.rglob("*")]:
        p.chmod(0o555 if p.is_dir() else 0o444)
    try:
        for cfg, before in zip(cfgs, first):
            pipeline.check_cache_dir(cfg)
            again = pipeline.prepare_corpus(cfg)
            assert again.from_cache and np.array_equal(again.train, before.train)
        # Another seq_len is a miss: it would have to write, and is refused up front.
        miss = DataConfig(path=str(corpus), cache_dir=str(cache), seq_len=8, val_fraction=0.0)
        with pytest.raises(ConfigError, match="^data.cache_dir: .*Read-only file system"):
            pipeline.check_cache_dir(miss)
    finally:
        for p in [cache, *cache.rglob("*")]:
            p.chmod(0o755 if p.is_dir() else 0o644)
    assert len(local_data) == 2, "only the two first preparations read the corpus"


# (A disk that fills up while shards are written: tests/test_prepare.py.)


# -- d, e: tampered exported files ------------------------------------------------------------

@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> Path:
    cfg = GPTConfig(n_layer=2, n_head=2, d_model=32, vocab_size=257, seq_len=32)
    out = tmp_path_factory.mktemp("export") / "good.safetensors"
    ex.save_safetensors(GPT(cfg), {"tokenizer": Tokenizer.byte_level().to_json()}, out)
    return out


def tampered(good: Path, out: Path, tensors=None, model=None, **metadata) -> Path:
    with safe_open(str(good), framework="pt") as f:
        meta = f.metadata()
    if model is not None:
        meta[ex.KEY_MODEL] = json.dumps({**json.loads(meta[ex.KEY_MODEL]), **model})
    meta.update(metadata)
    save_file(tensors or load_file(str(good)), str(out), metadata=meta)
    return out


def _generate(path: Path):
    return raypar("generate", "--checkpoint", str(path), "--max-new-tokens", "2")


def test_exported_file_loads(exported):
    model, meta = ex.load_exported(exported)
    assert meta["model"]["n_layer"] == 2 and meta["train_state"] == {}
    assert model.lm_head.weight is model.tok_emb.weight
    assert raypar("generate", "--checkpoint", str(exported), "--max-new-tokens", "2",
                  "--prompt", "ab").returncode == 0


@pytest.mark.parametrize("text, reason", [
    ('{"model": {"type": "BPE"', "not a valid tokenizer"),          # garbled JSON
    ('{"hello": 1}', "not a valid tokenizer"),                       # JSON, not a tokenizer
    ('["raypar_tokenizer"]', "not a valid tokenizer"),               # another JSON type
    (None, "ids but the model's vocab_size is 257"),
])
def test_tampered_tokenizer_metadata(exported, tmp_path, text, reason):
    if text is None:  # a real tokenizer, bigger than the model's vocabulary
        text = train_bpe(iter(["hello world " * 50, "abc def " * 50]), 300).to_json()
    bad = tampered(exported, tmp_path / "bad.safetensors", **{ex.KEY_TOKENIZER: text})
    assert_one_line(_generate(bad), str(bad), ex.KEY_TOKENIZER, reason)


@pytest.mark.parametrize("model, reason", [
    ({"n_layer": "2"}, "n_layer='2' is not an integer"),
    ({"n_layer": True}, "n_layer=True is not an integer"),
    ({"d_model": -32}, "d_model=-32 must be > 0"),
    ({"dropout": "high"}, "dropout='high' is not a finite number"),
    ({"pos_encoding": 3}, "pos_encoding=3 is not a string"),
    ({"colour": "red"}, "unknown key 'colour'"),
])
def test_model_metadata_with_wrong_types(exported, tmp_path, model, reason):
    bad = tampered(exported, tmp_path / "bad.safetensors", model=model)
    assert_one_line(_generate(bad), str(bad), ex.KEY_MODEL, reason)


def test_metadata_that_is_not_the_json_object_expected(exported, tmp_path):
    bad = tampered(exported, tmp_path / "bad.safetensors", **{ex.KEY_MODEL: "[1, 2]"})
    assert_one_line(_generate(bad), str(bad), "the model config is a list")
    bad = tampered(exported, tmp_path / "bad2.safetensors", **{ex.KEY_TRAIN_STATE: "[1]"})
    assert_one_line(_generate(bad), str(bad), ex.KEY_TRAIN_STATE, "not a JSON object")


@pytest.fixture
def no_real_model(monkeypatch):
    """Fails the test if a model is built anywhere but on the meta device."""
    real = ex.model_from_config

    def meta_only(cfg, where, device="cpu"):
        assert device == "meta", "a model was allocated before the file was checked"
        return real(cfg, where, device)
    monkeypatch.setattr(ex, "model_from_config", meta_only)


@pytest.mark.parametrize("model, reason", [
    # 24 layers in a file of 2 (GPT-2 medium's shapes: 1.5 GB if allocated).
    ({"n_layer": 24, "d_model": 1024, "n_head": 16, "vocab_size": 50304, "seq_len": 1024},
     "claims n_layer=24 but the file holds 18 tensors"),
    ({"n_layer": 10**9}, "claims n_layer=1000000000"),
    ({"d_model": 2048, "n_head": 16, "vocab_size": 50304},
     "tok_emb.weight has shape (257, 32), config needs (50304, 2048)"),
])
def test_header_is_checked_before_anything_is_allocated(exported, tmp_path, no_real_model,
                                                        model, reason):
    bad = tampered(exported, tmp_path / "bad.safetensors", model=model)
    assert bad.stat().st_size < 200_000
    assert_one_line(_generate(bad), str(bad), reason)


def test_header_dtype_and_size_are_checked(exported, tmp_path, no_real_model):
    tensors = load_file(str(exported))
    tensors["norm.weight"] = tensors["norm.weight"].to(torch.int32)
    bad = tampered(exported, tmp_path / "bad.safetensors", tensors=tensors)
    assert_one_line(_generate(bad), str(bad), "norm.weight has dtype I32")
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(exported.read_bytes()[:-100])  # the header's offsets pass the end
    assert_one_line(_generate(cut), str(cut), "not a readable safetensors file")


# -- export --out: a failed write leaves no temporary file ------------------------------------

def test_export_write_that_fails_leaves_no_tmp(tmp_path, monkeypatch):
    model = GPT(GPTConfig(n_layer=1, n_head=2, d_model=16, vocab_size=257, seq_len=8))
    meta = {"tokenizer": Tokenizer.byte_level().to_json()}

    def fail(src, dst):
        raise OSError(21, "Is a directory")
    monkeypatch.setattr(ex.os, "replace", fail)
    with pytest.raises(ConfigError, match=r"^--out: cannot write .*m\.safetensors"):
        ex.save_safetensors(model, meta, tmp_path / "m.safetensors")
    assert list(tmp_path.iterdir()) == []


# -- f: the validation share takes every training block ---------------------------------------

def test_val_fraction_that_leaves_no_training_block_names_it(tmp_path, local_data):
    corpus = write_corpus(tmp_path / "corpus")
    cfg = DataConfig(path=str(corpus), cache_dir=str(tmp_path / "c"), seq_len=32,
                     val_fraction=0.999)
    with pytest.raises(ConfigError, match=r"^data\.val_fraction: 0\.999 sends 12 of 12 "
                                          r"documents to validation.*lower data\.val_fraction$"):
        pipeline.prepare_corpus(cfg)
    # A corpus too short for one block whatever the split still names data.seq_len.
    cfg = DataConfig(path=str(corpus), cache_dir=str(tmp_path / "c"), seq_len=100_000,
                     val_fraction=0.5)
    with pytest.raises(ConfigError, match=r"^data\.seq_len: "):
        pipeline.prepare_corpus(cfg)
