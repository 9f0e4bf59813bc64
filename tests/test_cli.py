"""Bad input through the command line: one clear line, exit code 2, no stack trace,
no run directory left behind. The command runs in this process (raypar.cli.main, as the
console script calls it), except where the test is about the real process."""
import contextlib
import io
import subprocess
import sys
import time
from types import SimpleNamespace

import pytest

from raypar import cli

from conftest import ROOT

TINY = str(ROOT / "jobs" / "configs" / "tiny.yaml")


def raypar(*args):
    """`raypar ARGS` in this process: its exit code, stdout and stderr."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli.main(list(args))
    return SimpleNamespace(returncode=code, stdout=out.getvalue(), stderr=err.getvalue())


def test_the_real_command_exits_2_with_one_line(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "raypar.cli", "train", "--config", TINY,
                           "--set", "data.seq_len=0", "--run-dir", str(tmp_path / "r")],
                          capture_output=True, text=True, timeout=300)
    assert_user_error(proc, "data.seq_len", "> 0")
    assert not (tmp_path / "r").exists()


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
    ("tracking.experiment=", ["tracking.experiment", "empty"]),
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


@pytest.mark.parametrize("flag, value", [("--top-k", "-3"), ("--temperature", "nan"),
                                         ("--temperature", "-1"), ("--temperature", "inf")])
def test_generate_flags_are_named(flag, value, tmp_path):
    assert_user_error(raypar("generate", "--run-dir", str(tmp_path), flag, value), flag, value)


def test_plan_shows_every_rank_and_its_memory():
    proc = raypar("plan", "--config", TINY, "--set", "model.n_layer=4", "--set", "parallel.dp=2",
                  "--set", "parallel.tp=2", "--set", "parallel.pp=2")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0].startswith("layout: dp=2 x pp=2 x tp=2 = 8 workers")
    table = [l.split() for l in lines if l.strip() and l.split()[0].isdigit()]
    assert [int(row[0]) for row in table] == list(range(8))
    # tp innermost, then pp, then dp; stage 0 holds the first layers, stage 1 the rest
    assert [(int(r[1]), int(r[2]), int(r[3])) for r in table[:4]] == \
           [(0, 0, 0), (0, 0, 1), (0, 1, 0), (0, 1, 1)]
    assert table[0][5] != table[2][5]
    assert all(float(r[-2]) > 0 for r in table)       # total MiB per rank


@pytest.mark.parametrize("override, fragments", [
    (["parallel.tp=3"], ["model.n_head", "parallel.tp=3"]),
    (["parallel.pp=3"], ["model.n_layer", "pipeline stages"]),
    (["parallel.schedule=zigzag"], ["parallel.schedule", "gpipe"]),
])
def test_plan_rejects_impossible_layouts(override, fragments):
    args = [a for o in override for a in ("--set", o)]
    assert_user_error(raypar("plan", "--config", TINY, *args), *fragments)


# A local Ray started by raypar's own function, in its own process (as `raypar train` does),
# which holds a named actor until its stdin closes.
LOCAL_RAY = """
import sys
import ray
from raypar.cluster import connect, local_ray_note
assert connect(None, 1, dashboard_port=int(sys.argv[1]))

@ray.remote
class Probe:
    def ping(self):
        return 1

probe = Probe.options(name="raypar-probe").remote()
ray.get(probe.ping.remote())
print(local_ray_note(), flush=True)
sys.stdin.read()
ray.shutdown()
"""


@pytest.mark.ray
def test_ray_status_and_list_actors_see_a_local_run_from_another_shell(tmp_path):
    """What the start-up line tells the user to type in another shell of theirs works:
    `ray status` and `ray list actors` (the dashboard's state API), with Ray's default
    token authentication on, against the dashboard on 127.0.0.1 at the port asked for."""
    import os
    import re

    from conftest import free_port
    pytest.importorskip("ray.dashboard.optional_deps")
    port = free_port()
    env = {k: v for k, v in os.environ.items()
           if k not in ("RAY_ADDRESS", "RAY_AUTH_MODE", "PYTHONPATH")}
    env.update(PYTHONPATH=str(ROOT), RAYPAR_DASHBOARD="1")
    proc = subprocess.Popen([sys.executable, "-c", LOCAL_RAY, str(port)], cwd=tmp_path, env=env,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        note = proc.stdout.readline().strip()
        assert note.startswith(f"Ray dashboard at http://127.0.0.1:{port}; from another "
                               f"shell: RAY_ADDRESS="), note
        shell = dict(re.findall(r"(RAY_\w+)=(\S+)", note))
        assert shell["RAY_AUTH_MODE"] == "token" and set(shell) == {"RAY_ADDRESS",
                                                                   "RAY_AUTH_MODE"}
        other = {**env, **shell}
        # Both at once, as two other shells would (a CLI start costs seconds).
        status, actors = [subprocess.Popen(cmd, env=other, stdout=subprocess.PIPE,
                                           stderr=subprocess.PIPE, text=True)
                          for cmd in (["ray", "status"], ["ray", "list", "actors"])]
        out, err = status.communicate(timeout=120)
        # Ray's monitor publishes the first cluster status a few seconds after the start
        # (longer on a loaded machine); until then `ray status` says so, and the user (as
        # Ray's message tells them) asks again.
        deadline = time.monotonic() + 90
        while status.returncode == 0 and "No cluster status" in out \
                and time.monotonic() < deadline:
            time.sleep(2)
            status = subprocess.run(["ray", "status"], env=other, capture_output=True,
                                    text=True, timeout=120)
            out, err = status.stdout, status.stderr
        assert status.returncode == 0 and "Active:" in out, (out, err)
        out, err = actors.communicate(timeout=120)
        assert actors.returncode == 0, err
        [row] = [line for line in out.splitlines() if "raypar-probe" in line]
        assert "ALIVE" in row and "Probe" in row
    finally:
        proc.stdin.close()
        proc.wait(timeout=120)


def test_without_the_dashboard_one_line_says_how_to_get_it(monkeypatch):
    from raypar import cluster
    monkeypatch.setattr(cluster, "_local", {"gcs": "10.0.0.2:6379", "dashboard": None,
                                            "missing": "No module named 'aiohttp'",
                                            "token": True})
    monkeypatch.setattr(cluster.ray, "is_initialized", lambda: True)
    assert cluster.local_ray_note() == (
        "Ray dashboard not started: its packages are missing (No module named 'aiohttp'); "
        "pip install 'ray[default]' for it and `ray list actors`. From another shell: "
        "RAY_ADDRESS=10.0.0.2:6379 RAY_AUTH_MODE=token ray status")
    monkeypatch.setattr(cluster, "_local", {"gcs": "10.0.0.2:6379", "dashboard": None,
                                            "missing": None, "token": False})
    assert cluster.local_ray_note() == ("Ray dashboard off (RAYPAR_DASHBOARD=0); from "
                                        "another shell: RAY_ADDRESS=10.0.0.2:6379 ray status")


def test_a_bad_dashboard_switch_is_refused_before_ray_starts(monkeypatch):
    from raypar.cluster import connect
    from raypar.config import ConfigError
    monkeypatch.setenv("RAYPAR_DASHBOARD", "yes")
    with pytest.raises(ConfigError, match=r"^RAYPAR_DASHBOARD: 'yes' is not 0 "):
        connect(None, 1)
