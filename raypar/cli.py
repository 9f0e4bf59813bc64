"""The `raypar` command line.

    raypar train                                   # default laptop config, built-in corpus
    raypar train --config jobs/configs/tiny.yaml --set train.steps=50 --run-dir runs/t
    raypar generate --run-dir runs/t --prompt "def main(" --max-new-tokens 200
    raypar train --resume runs/t --set train.steps=100  # continue (any layout) from its checkpoint
    raypar export runs/t                           # -> runs/t/export/ (transformers loads it)
    raypar export runs/t --format raypar           # -> runs/t/export.safetensors
    raypar generate --checkpoint runs/t/export.safetensors --prompt "def "
    raypar bench --quick --out runs/bench               # raypar vs bare PyTorch and torchrun
    raypar prepare --set data.path=corpus/ --set data.dataset_dir=s3://bucket/ds  # token shards

User errors print one line `raypar: error: ...` and exit with code 2.
"""
from __future__ import annotations

import argparse
import math
import os
import signal
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Optional

from raypar.config import ConfigError, load_spec
from raypar.train.rundir import EXPORT_RAYPAR, RunDir

# Each command imports what pulls in torch or ray (seconds) inside its function, so
# that `--help` and a config error print in a fraction of a second.


def _spec_options(p) -> None:
    """--config and --set: the run spec, as `load_spec(args.config, args.overrides)` reads it."""
    p.add_argument("--config", help="YAML run config (default: the built-in laptop defaults, "
                   "the same as jobs/configs/laptop.yaml)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override one field, e.g. --set train.lr=3e-4 (repeatable)")


def _train_parser(sub) -> None:
    p = sub.add_parser("train", help="train a model (on a local Ray unless --address / RAY_ADDRESS)")
    _spec_options(p)
    p.add_argument("--run-dir", help="run directory (default: runs/<name>-<timestamp>)")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR from its "
                   "latest valid checkpoint, with its config.yaml plus any --set (the layout "
                   "may change: parallel.dp/tp/pp/dp_mode...)")
    p.add_argument("--restart", action="store_true", help="with --resume: train the run again "
                   "from step 0 in its directory (e.g. when no checkpoint verifies); its old "
                   "records and checkpoints move to RUN_DIR/restarted-<time>/")
    p.add_argument("--address", help="Ray cluster address (default: $RAY_ADDRESS, else local)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def _generate_parser(sub) -> None:
    p = sub.add_parser("generate", help="sample text from a trained model")
    p.add_argument("--run-dir", help="a run directory: its newest valid checkpoint is used (else "
                   f"its {EXPORT_RAYPAR}); with --checkpoint, the two must match")
    p.add_argument("--checkpoint", help="a checkpoint directory (step_*) or a file written by "
                   "`raypar export --format raypar`")
    p.add_argument("--prompt", default="", help="text to continue")
    p.add_argument("--max-new-tokens", type=int, default=200)
    p.add_argument("--temperature", type=float, default=0.8, help="0 means greedy")
    p.add_argument("--top-k", type=int, default=50, help="0 disables top-k filtering")
    p.add_argument("--seed", type=int, default=0)


def _export_parser(sub) -> None:
    p = sub.add_parser("export", help="consolidate a checkpoint into a Hugging Face model "
                       "directory (transformers loads it), or one raypar safetensors file")
    p.add_argument("run_dir", metavar="RUN_DIR", help="the run directory")
    p.add_argument("--checkpoint", help="a checkpoint directory (default: the newest valid one "
                   "under RUN_DIR)")
    p.add_argument("--format", choices=("hf", "raypar"), default="hf", help="hf (default): "
                   "config.json, model.safetensors and tokenizer files for transformers' "
                   "AutoModelForCausalLM / AutoTokenizer; raypar: one file with raypar's "
                   "names and config, which `raypar generate --checkpoint` reads")
    p.add_argument("--out", help="output directory (hf; default: RUN_DIR/export) or file "
                   f"(raypar; default: RUN_DIR/{EXPORT_RAYPAR})")
    p.add_argument("--no-mlflow", action="store_true", help="do not log the hf export as the "
                   "run's MLflow model (by default it is, when the run has an MLflow run)")


def _plan_parser(sub) -> None:
    p = sub.add_parser("plan", help="show which rank holds which stage and shard, and the "
                       "memory each needs; reject impossible layouts (starts no workers)")
    _spec_options(p)
    p.add_argument("--address", help="Ray cluster to place the ranks on (default: "
                   "$RAY_ADDRESS; without one, no node placement is shown)")


def _bench_parser(sub) -> None:
    p = sub.add_parser("bench", help="measure raypar side by side with a bare PyTorch loop "
                       "and torchrun; write bench.json, bench.md and charts")
    p.add_argument("--quick", action="store_true", help="fewer steps and repeats (about 2 "
                   "minutes on 2 cores)")
    p.add_argument("--out", help="output directory (default: runs/bench-<timestamp>)")
    p.add_argument("--address", help="Ray cluster address (default: $RAY_ADDRESS, else local)")
    p.add_argument("--only", metavar="SECTION,...", help="measure only these sections (and "
                   "what their rows read): prepare, throughput, probe, memory, scale, cuda")


def _prepare_parser(sub) -> None:
    p = sub.add_parser("prepare", help="read and tokenize the corpus with Ray Data into a "
                       "dataset directory of token shards (data.dataset_dir, else the cache), "
                       "which later runs reuse; give it as data.path to train from it anywhere")
    _spec_options(p)
    p.add_argument("--address", help="Ray cluster address (default: $RAY_ADDRESS, else local)")
    p.add_argument("--force", action="store_true", help="prepare again even when a finished "
                   "dataset of this corpus and tokenizer is there")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="raypar", description=(
        "Train GPT-style language models on Ray with data, tensor and pipeline parallelism."))
    sub = parser.add_subparsers(dest="command", required=True)
    _train_parser(sub)
    _generate_parser(sub)
    _export_parser(sub)
    _plan_parser(sub)
    _bench_parser(sub)
    _prepare_parser(sub)
    return parser


def cmd_train(args: argparse.Namespace) -> int:
    if args.restart and not args.resume:
        raise ConfigError("--restart: give it with --resume RUN_DIR (it starts that run over)")
    if args.resume:
        if args.config or args.run_dir:
            raise ConfigError("--resume: the run's own config.yaml and directory are used; "
                              "drop --config/--run-dir and change fields with --set")
        run_dir = Path(args.resume)
        if not RunDir(run_dir).config.is_file():
            raise ConfigError(f"--resume: {run_dir} is not a raypar run directory "
                              f"(no config.yaml)")
        spec = load_spec(RunDir(run_dir).config, args.overrides)
    else:
        spec = load_spec(args.config, args.overrides)
        run_dir = Path(args.run_dir) if args.run_dir else None
    # Ray's C++ crash handler would answer a SIGTERM that lands while ray.init runs (before
    # raypar's own handler is back, raypar/train/stopping.py) with an abort and a stack dump;
    # read when ray is imported, so set before. (Set RAY_DISABLE_FAILURE_SIGNAL_HANDLER=0
    # to keep it, e.g. to debug a crash of the local Ray's processes.)
    os.environ.setdefault("RAY_DISABLE_FAILURE_SIGNAL_HANDLER", "1")
    from raypar.train.driver import run
    summary = run(spec, run_dir, args.address, progress=not args.no_progress,
                  resume=bool(args.resume), restart=args.restart, started=args.started)
    val = summary["final_val_loss"]
    print(f"done: {summary['steps']} steps, loss {summary['final_loss']:.4f}"
          + (f", val_loss {summary['first_val_loss']:.4f} -> {val:.4f}" if val is not None else "")
          + f", {summary['tokens']:,} tokens in {summary['seconds']:.0f} s")
    print(f"run dir: {summary['run_dir']}")
    if summary["mlflow_run_id"]:
        print(f"mlflow run: {summary['mlflow_run_id']}  "
              f"(mlflow ui --backend-store-uri {summary['mlflow_uri']})")
    return 0


def cmd_prepare(args: argparse.Namespace) -> int:
    spec = load_spec(args.config, args.overrides)  # (a config error before seconds of imports)
    os.environ.setdefault("RAY_DISABLE_FAILURE_SIGNAL_HANDLER", "1")  # as in cmd_train

    from raypar.data import mixture, pipeline, prepare
    data, started = spec.data, time.monotonic()
    cache = pipeline.default_cache_dir(data)
    # What can be refused is refused before Ray starts; and datasets that are finished (or
    # a data.path that is one) are only read: no Ray at all.
    mixture.precheck(data, cache)
    work = args.force or not mixture.ready(data, cache)
    if work:
        import logging

        from ray.data import DataContext

        from raypar.cluster import connect
        connect(args.address, 1)
        logging.getLogger("ray.data").setLevel(logging.ERROR)
        DataContext.get_current().enable_progress_bars = False  # ours instead, below
    show, every, end = prepare.console_progress()
    for ds in mixture.prepare_all(data, cache, progress=show, force=args.force,
                                  progress_every=every):
        if work:
            end()
        tokens = ds.tokens("train") + ds.tokens("val")
        print(f"{'reused' if ds.from_cache else 'prepared'} {ds.path}: {ds.stats['n_docs']:,} "
              f"documents, {tokens:,} tokens ({ds.tokens('train'):,} train, "
              f"{ds.tokens('val'):,} val), {ds.shards('train') + ds.shards('val')} shards, "
              f"{time.monotonic() - started:.1f} s")
    return 0


def _generation_source(args: argparse.Namespace):
    """(model, meta) from --checkpoint (a folder or a .safetensors file) or --run-dir."""
    from raypar import export as ex
    from raypar.train import checkpoint as ckpt

    run_dir, source = args.run_dir, args.checkpoint
    if run_dir is None and source is None:
        raise ConfigError("give --run-dir or --checkpoint")
    if run_dir is not None and not Path(run_dir).is_dir():
        raise ConfigError(f"--run-dir: no such directory: {run_dir}")
    if source is None:
        source = ckpt.latest_valid(run_dir, ex.log)
        if source is None:
            rd = RunDir(run_dir)
            # export/model.safetensors was the raypar file before exports became HF folders
            # (a HF export's model.safetensors beside its config.json is not one).
            found = [p for p in (rd.export_raypar, rd.export_legacy) if p.is_file()
                     and not (p.parent / "config.json").is_file()]
            if not found:
                raise ConfigError(f"--run-dir: no checkpoint that verifies under {run_dir} "
                                  f"(and no {EXPORT_RAYPAR})")
            source = found[0]
    elif not Path(source).exists():
        raise ConfigError(f"--checkpoint: no such file or directory: {source}")
    if Path(source).is_dir() and (Path(source) / "config.json").is_file() \
            and not (Path(source) / ckpt.META).is_file():
        raise ConfigError(f"--checkpoint: {source} is a Hugging Face export, which transformers "
                          f"loads (AutoModelForCausalLM.from_pretrained); raypar generate reads "
                          f"a checkpoint or `raypar export --format raypar`'s file")
    if Path(source).is_file():
        model, meta = ex.load_exported(source)
    else:
        if not (Path(source) / ckpt.META).is_file():
            raise ConfigError(f"--checkpoint: {source} is not a raypar checkpoint (no meta.json)")
        model, meta = ex.consolidate(ex.find_checkpoint(None, source))
    if run_dir is not None:
        expected = ex.run_model_config(run_dir)
        if expected is not None:
            ckpt.check_compatible(meta, expected)
    return model, meta


def cmd_plan(args: argparse.Namespace) -> int:
    spec = load_spec(args.config, args.overrides)  # (a config error before seconds of imports)
    from raypar.cluster import check_capacity, check_local_memory, connect
    from raypar.data.tokenizer import expected_vocab
    from raypar.hf_import import model_vocab
    from raypar.parallel.footprint import plan
    from raypar.plan import format_plan, place_on_nodes
    vocab = model_vocab(spec, expected_vocab(spec.data))
    plans = plan(spec, vocab)
    address = args.address or os.environ.get("RAY_ADDRESS")
    if address:
        import ray
        connect(address, spec.world_size * spec.train.threads)
        use_gpu = int(ray.cluster_resources().get("GPU", 0)) > 0
        check_capacity(spec, False, vocab, use_gpu)
        place_on_nodes(plans, ray.nodes(), "GPU" if use_gpu else "CPU",
                       1 if use_gpu else spec.train.threads)
    else:
        check_local_memory(spec, vocab)
    print(format_plan(spec, plans, vocab))
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    if args.max_new_tokens < 1:
        raise ConfigError("--max-new-tokens: must be >= 1")
    if not math.isfinite(args.temperature) or args.temperature < 0:
        raise ConfigError(f"--temperature: must be a number >= 0 (0 is greedy), got "
                          f"{args.temperature}")
    if args.top_k < 0:
        raise ConfigError(f"--top-k: must be >= 0 (0 disables top-k filtering), got {args.top_k}")
    import torch

    from raypar.data.tokenizer import Tokenizer

    model, meta = _generation_source(args)
    tok = Tokenizer.from_json(meta["tokenizer"])
    ids = tok.encode(args.prompt) if args.prompt else [tok.eot_id]
    gen = torch.Generator().manual_seed(args.seed)
    out = model.generate(torch.tensor([ids]), args.max_new_tokens, temperature=args.temperature,
                         top_k=args.top_k or None, generator=gen)
    print(tok.decode(out[0].tolist()))
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    if not Path(args.run_dir).is_dir():
        raise ConfigError(f"RUN_DIR: no such directory: {args.run_dir}")
    from raypar.export import export
    out = export(args.run_dir, args.checkpoint, args.out, format=args.format,
                 log_model=not args.no_mlflow)
    size = sum(p.stat().st_size for p in out.iterdir()) if out.is_dir() else out.stat().st_size
    print(f"exported: {out} ({size / 2**20:.1f} MiB)")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    out = Path(args.out) if args.out else Path("runs") / datetime.now().strftime(
        "bench-%Y%m%d-%H%M%S")
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out: {out} exists and is not a directory")
    if (out / "bench.json").exists():
        raise ConfigError(f"--out: {out} already holds a bench report; choose another "
                          f"directory")
    only = [name.strip() for name in args.only.split(",")] if args.only else None
    from raypar.bench import run_bench  # (seconds of torch and ray: after the checks above)
    report = run_bench(out, quick=args.quick, address=args.address, only=only)
    print((out / "bench.md").read_text(), end="")
    missed = [r["name"] for r in report["rows"] if r["met"] is False]
    print(f"{len(report['rows'])} rows in {report['seconds']:.0f} s; "
          f"{len(missed)} targets missed; report: {out / 'bench.json'}")
    return 0


def main(argv: Optional[list[str]] = None) -> int:
    started = time.time()  # the start-up profile counts from here (raypar/train/startup.py)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    args = build_parser().parse_args(argv)
    args.started = started
    try:
        return {"train": cmd_train, "generate": cmd_generate, "plan": cmd_plan,
                "export": cmd_export, "bench": cmd_bench,
                "prepare": cmd_prepare}[args.command](args)
    except ConfigError as e:
        print(f"raypar: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:  # (raypar.train.stopping.Stopped carries its signal)
        print("raypar: interrupted", file=sys.stderr)
        return 128 + getattr(e, "signum", signal.SIGINT)
    except RuntimeError as e:
        print(f"raypar: {str(e).splitlines()[0] if str(e) else type(e).__name__}", file=sys.stderr)
        # A run stopped by a signal (raypar.train.stopping.Interrupted) exits 128 + signal.
        signum = getattr(e, "signum", None)
        return 128 + signum if isinstance(signum, int) else 1

if __name__ == "__main__":
    sys.exit(main())
