"""Shared fixtures: one local Ray per test module, a small real corpus, isolated caches."""
import os
import shutil
import sysconfig
from pathlib import Path

import pytest

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.pop("MLFLOW_TRACKING_URI", None)
os.environ.pop("RAY_ADDRESS", None)

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def ray_local():
    """A real local Ray with more logical CPUs than cores, so multi-worker layouts schedule."""
    import ray
    ray.init(address="local", num_cpus=8, include_dashboard=False, log_to_driver=False,
             configure_logging=True, logging_level="WARNING")
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def small_corpus(tmp_path_factory) -> Path:
    """About 400 KB of real Python source: the first 40 small standard-library modules."""
    out = tmp_path_factory.mktemp("corpus")
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    small = [p for p in sorted(stdlib.glob("*.py")) if 2_000 < p.stat().st_size < 20_000]
    for p in small[:40]:
        shutil.copy(p, out / (p.name + ".txt"))
    return out


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cache")
