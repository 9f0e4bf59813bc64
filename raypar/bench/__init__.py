"""`raypar bench`: raypar side by side with the baselines (see suite.py)."""
from typing import Any

__all__ = ["run_bench"]


def __getattr__(name: str) -> Any:
    # run_bench on first use: the baseline processes (`python -m raypar.bench.baseline`)
    # import this package too, and need neither ray nor the suite (a second of imports).
    if name == "run_bench":
        from raypar.bench.suite import run_bench
        return run_bench
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
