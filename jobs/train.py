"""Entry point for `ray job submit`; takes the same arguments as `raypar train`.

    ray job submit --working-dir . -- python jobs/train.py --config jobs/configs/tiny.yaml

The job's driver joins the cluster named by RAY_ADDRESS (set by the job server).
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the working dir's raypar

from raypar.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
