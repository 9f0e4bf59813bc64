"""`raypar bench`: raypar side by side with the baselines (see suite.py)."""
from raypar.bench.suite import run_bench

__all__ = ["run_bench"]
