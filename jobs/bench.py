"""Entry point for `ray job submit`; takes the same arguments as `raypar bench`.

    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \
        python jobs/bench.py --quick --out /shared/runs/bench1

The job's driver joins the cluster named by RAY_ADDRESS (set by the job server). The code
comes from the working directory; its dependencies must be installed on the cluster's nodes
(`pip install -e .` there, as cluster.yaml's setup commands do) or named in the job's
runtime environment (`--runtime-env-json '{"pip": [...]}'`).
"""
import sys

from _entry import run  # jobs/_entry.py (this script's directory is on sys.path)

if __name__ == "__main__":
    sys.exit(run("bench"))
