"""Entry point for `ray job submit`; takes the same arguments as `raypar bench`.

    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \
        python jobs/bench.py --quick --out /shared/runs/bench1

How the job finds the cluster, its code and its dependencies: see jobs/train.py.
"""
import sys

from _entry import run  # jobs/_entry.py (this script's directory is on sys.path)

if __name__ == "__main__":
    sys.exit(run("bench"))
