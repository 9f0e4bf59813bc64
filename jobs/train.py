"""Entry point for `ray job submit`; takes the same arguments as `raypar train`.

    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \
        python jobs/train.py --config jobs/configs/tiny.yaml --run-dir /shared/runs/t1

The job's driver joins the cluster named by RAY_ADDRESS (set by the job server). The code
comes from the working directory; its dependencies must be installed on the cluster's nodes
(`pip install -e .` there, as cluster.yaml's setup commands do) or named in the job's
runtime environment (`--runtime-env-json '{"pip": [...]}'`).
"""
import sys
from pathlib import Path

try:  # the project's dependencies, checked before anything else touches them
    import mlflow  # noqa: F401
    import pyarrow  # noqa: F401
    import ray.train  # noqa: F401
    import tokenizers  # noqa: F401
    import torch  # noqa: F401
    import yaml  # noqa: F401
except ImportError as e:
    sys.stderr.write(
        f"raypar: error: this job's Python ({sys.executable}) cannot import {e.name}: install "
        f"the project on every node (pip install -e . in the repository, as cluster.yaml does) "
        f"or list the packages in --runtime-env-json '{{\"pip\": [...]}}'\n")
    sys.exit(2)

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the working dir's raypar

from raypar.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
