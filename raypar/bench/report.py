"""The bench's outputs: bench.json (every row and its samples), bench.md (the table),
PNG charts, and one MLflow run holding all of them."""
from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

from raypar.train.tracking import artifact_location

CHARTS = ("bench_ratios.png", "bench_pipeline.png", "bench_memory.png")


def _fmt(x: float) -> str:
    if x == 0:
        return "0"
    if abs(x) >= 100:
        return f"{x:,.0f}"
    if abs(x) >= 1:
        return f"{x:.2f}"
    return f"{x:.3g}"


def markdown(report: dict[str, Any]) -> str:
    m = report["machine"]
    lines = [f"raypar bench ({report['mode']}, {report['seconds']:.0f} s): {m['cpus']} cores, "
             f"torch {m['torch']}, ray {m['ray']}" + (f", {m['cuda']}" if m.get("cuda") else ""),
             "", "| section | measurement | value | spread (min .. max) | target | met |",
             "|---|---|---|---|---|---|"]
    for r in report["rows"]:
        unit = "" if r["unit"] in ("x", "fraction") else f" {r['unit']}"
        value = f"{_fmt(r['value'])}{'x' if r['unit'] == 'x' else ''}{unit}"
        lo, hi = r["spread"]
        met = {True: "yes", False: "**no**", None: ""}[r["met"]]
        lines.append(f"| {r['section']} | {r['name']} | {value} | {_fmt(lo)} .. {_fmt(hi)} | "
                     f"{r['target'] or ''} | {met} |")
    if isinstance(report["context"].get("cuda"), str):
        lines += ["", f"CUDA: {report['context']['cuda']}"]
    return "\n".join(lines) + "\n"


def charts(report: dict[str, Any], out: Path) -> list[Path]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = report["rows"]
    paths = []

    def bars(selected, title, path, xlabel, reference=None):
        fig, ax = plt.subplots(figsize=(9, 0.45 * len(selected) + 1.4))
        names = [r["name"] for r in selected]
        values = [r["value"] for r in selected]
        err = [[r["value"] - r["spread"][0] for r in selected],
               [r["spread"][1] - r["value"] for r in selected]]
        colors = ["tab:green" if r["met"] else "tab:red" if r["met"] is False else "tab:gray"
                  for r in selected]
        ax.barh(range(len(selected)), values, xerr=err, color=colors, capsize=3)
        ax.set_yticks(range(len(selected)), names, fontsize=8)
        ax.invert_yaxis()
        if reference is not None:
            ax.axvline(reference, color="black", linewidth=0.8)
        ax.set_xlabel(xlabel)
        ax.set_title(title)
        fig.tight_layout()
        fig.savefig(path, dpi=100)
        plt.close(fig)
        paths.append(path)

    bars([r for r in rows if r["section"] in ("overhead", "launcher", "scaling")
          and r["unit"] == "x"], "Throughput ratios (green: target met)",
         out / CHARTS[0], "ratio", reference=1.0)
    bars([r for r in rows if r["section"] == "pipeline"],
         "Pipeline bubble, measured / theory (target 0.8 .. 1.2)", out / CHARTS[1],
         "measured / theory", reference=1.0)
    bars([r for r in rows if r["section"] == "memory"],
         "Per-rank parameters + gradients + optimizer state / ideal (target <= 1.1)",
         out / CHARTS[2], "measured / ideal", reference=1.0)
    return paths


def _metric_key(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_./ -]", "_", name).replace(" ", "_")[:250]


def write_report(report: dict[str, Any], out: Path) -> None:
    """bench.md, the charts and bench.json in out, and one MLflow run (experiment
    'raypar-bench') with every row as a metric and the files as artifacts; the store is
    $MLFLOW_TRACKING_URI, else out/mlflow.db."""
    from mlflow.tracking import MlflowClient
    md_path = out / "bench.md"
    md_path.write_text(markdown(report))
    files = [md_path, *charts(report, out)]
    uri = os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{out.resolve() / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name("raypar-bench")
    # Artifacts beside the store (out/ by default), never ./mlruns in the working directory.
    exp_id = exp.experiment_id if exp else client.create_experiment(
        "raypar-bench", artifact_location=artifact_location(uri, "raypar-bench"))
    run_id = client.create_run(exp_id, run_name=f"bench-{report['mode']}").info.run_id
    report["mlflow"] = {"uri": uri, "run_id": run_id}
    (out / "bench.json").write_text(json.dumps(report, indent=2))
    files.append(out / "bench.json")
    for r in report["rows"]:
        client.log_metric(run_id, _metric_key(f"{r['section']}/{r['name']}"), r["value"])
    client.log_param(run_id, "mode", report["mode"])
    for k, v in report["machine"].items():
        client.log_param(run_id, f"machine.{k}", str(v))
    for f in files:
        client.log_artifact(run_id, str(f))
    client.set_terminated(run_id, "FINISHED")
