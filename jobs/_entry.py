"""What jobs/train.py and jobs/bench.py share: check the job's Python has the project's
dependencies (one clear line and exit 2 if not), then run the `raypar` command line from
the working directory's package."""
import sys
from pathlib import Path


def run(command: str) -> int:
    try:  # the project's dependencies, checked before anything else touches them
        import mlflow  # noqa: F401
        import pyarrow  # noqa: F401
        import ray.train  # noqa: F401
        import tokenizers  # noqa: F401
        import torch  # noqa: F401
        import yaml  # noqa: F401
    except ImportError as e:
        sys.stderr.write(
            f"raypar: error: this job's Python ({sys.executable}) cannot import {e.name}: "
            f"install the project on every node (pip install -e . in the repository, as "
            f"cluster.yaml does) or list the packages in --runtime-env-json "
            f"'{{\"pip\": [...]}}'\n")
        return 2
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the working dir's raypar
    from raypar.cli import main
    return main([command, *sys.argv[1:]])
