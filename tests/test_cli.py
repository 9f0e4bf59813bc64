"""Bad input through the real command line: one clear line, exit code 2, no stack trace,
no run directory left behind."""
import subprocess
import sys

import pytest

from conftest import ROOT

TINY = str(ROOT / "jobs" / "configs" / "tiny.yaml")


def raypar(*args, cwd=None, env=None):
    return subprocess.run([sys.executable, "-m", "raypar.cli", *args], capture_output=True,
                          text=True, timeout=300, cwd=cwd, env=env)


def assert_user_error(proc, *fragments):
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("raypar: error: "), proc.stderr
    assert "Traceback" not in proc.stderr
    for f in fragments:
        assert f in lines[0]


@pytest.mark.parametrize("override, fragments", [
    ("data.seq_len=0", ["data.seq_len", "> 0"]),
    ("data.seq_len=-5", ["data.seq_len"]),
    ("train.global_batch=7", ["train.global_batch", "divisible"]),
    ("train.lr=fast", ["train.lr", "number"]),
    ("model.n_layers=3", ["model.n_layers", "unknown key"]),
])
def test_invalid_config_exits_2(override, fragments, tmp_path):
    proc = raypar("train", "--config", TINY, "--set", override, "--run-dir", str(tmp_path / "r"))
    assert_user_error(proc, *fragments)
    assert not (tmp_path / "r").exists()


def test_missing_data_path(tmp_path):
    proc = raypar("train", "--config", TINY, "--set", f"data.path={tmp_path}/nope",
                  "--run-dir", str(tmp_path / "r"))
    assert_user_error(proc, "data.path", "nope")
    assert not (tmp_path / "r").exists()


def test_unreachable_mlflow(tmp_path):
    proc = raypar("train", "--config", TINY, "--set", "tracking.uri=http://127.0.0.1:9",
                  "--run-dir", str(tmp_path / "r"))
    assert_user_error(proc, "tracking.uri", "127.0.0.1:9")
    assert not (tmp_path / "r").exists()


def test_empty_corpus(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "a.txt").write_text("")
    proc = raypar("train", "--config", TINY, "--set", f"data.path={empty}",
                  "--set", f"data.cache_dir={tmp_path / 'cache'}", "--run-dir", str(tmp_path / "r"))
    assert_user_error(proc, "data.path", "empty")
    assert not (tmp_path / "r").exists()


def test_layout_larger_than_this_machine(tmp_path):
    proc = raypar("train", "--config", TINY, "--set", "parallel.dp=512",
                  "--set", "train.global_batch=1024", "--run-dir", str(tmp_path / "r"))
    assert_user_error(proc, "parallel", "512 workers", "GiB")
    assert not (tmp_path / "r").exists()


def test_generate_without_checkpoint(tmp_path):
    assert_user_error(raypar("generate", "--run-dir", str(tmp_path)), "--run-dir", "no checkpoint")
