"""The data section's preparation measurements: tokens/s of `raypar prepare` with Ray Data
held to 1 and to 2 CPUs against the HF tokenizers library's encode_batch in one plain
process, and the driver's own peak memory while preparing two corpora 4x apart.

    rates = prepare_rates(corpus_jsonl, cache, tokenizer="bpe", cpus=(1, 2), repeats=2)
    peaks = driver_peaks(gcs_address, [small, large], cache)    # {path: peak RSS, tokens}
"""
from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Optional

import numpy as np

from raypar.config import DataConfig

# The driver of one preparation, in a process of its own so that its peak RSS is its own:
# argv: Ray's address, the corpus, the cache folder. Prints one JSON line.
DRIVER = """
import json, resource, sys
import ray
from raypar.config import DataConfig
from raypar.data.prepare import prepare_dataset
ray.init(address=sys.argv[1], log_to_driver=False, logging_level="ERROR")
cfg = DataConfig(path=sys.argv[2], tokenizer="byte", cache_dir=sys.argv[3], val_fraction=0.05)
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
ds = prepare_dataset(cfg)
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"before_kb": before, "peak_kb": peak, "tokens": ds.tokens("train")}))
"""


def random_jsonl(folder: Path, mb: int, seed: int = 0) -> Path:
    """A corpus of about mb MB: files of up to 2000 documents of 2 KB of random words."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    letters = np.frombuffer(b"abcdefgh ijklmnop qrstuvwxyz", dtype=np.uint8)
    docs = mb * 500
    for f in range(-(-docs // 2000)):
        rows = letters[rng.integers(0, letters.size, size=(min(2000, docs - 2000 * f), 2000))]
        (folder / f"part-{f}.jsonl").write_text("".join(
            json.dumps({"text": r.tobytes().decode()}) + "\n" for r in rows))
    return folder


def source_jsonl(dest: Path, texts: list[str], mb: float, files: int = 4) -> Path:
    """A folder of `files` .jsonl files of real text (the documents repeated) holding mb MB
    in all: files, so that several read tasks can share the work."""
    dest.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps({"text": t}) + "\n" for t in texts]
    for f in range(files):
        size, out = 0, []
        while size < mb * 1e6 / files:
            for line in lines:
                out.append(line)
                size += len(line)
        (dest / f"part-{f}.jsonl").write_text("".join(out))
    return dest


def driver_peak(address: str, corpus: Path, cache: Path) -> dict[str, Any]:
    """Prepare corpus from a fresh driver process on the Ray at address: its peak RSS (kB)
    before and after, the training tokens written and the corpus's bytes."""
    out = subprocess.run([sys.executable, "-c", DRIVER, address, str(corpus), str(cache)],
                         capture_output=True, text=True, timeout=900)
    if out.returncode != 0:
        raise RuntimeError(f"the preparation driver failed: {out.stderr[-2000:]}")
    found = json.loads(out.stdout.strip().splitlines()[-1])
    return {**found, "bytes": sum(p.stat().st_size for p in Path(corpus).rglob("*.jsonl"))}


def _prepare_once(cfg: DataConfig, cache: Path, cpus: Optional[int]) -> tuple[int, float]:
    """(tokens, seconds) of one cold preparation (force) with Ray Data held to cpus."""
    from ray.data import DataContext, ExecutionResources

    from raypar.data.prepare import prepare_dataset
    ctx = DataContext.get_current()
    before = ctx.execution_options.resource_limits
    ctx.execution_options.resource_limits = ExecutionResources(cpu=cpus)
    try:
        t0 = time.perf_counter()
        ds = prepare_dataset(cfg, cache, force=True)
        seconds = time.perf_counter() - t0
    finally:
        ctx.execution_options.resource_limits = before
    return ds.tokens("train") + ds.tokens("val"), seconds


def prepare_rates(corpus: Path, cache: Path, cpus: tuple[int, ...] = (1, 2),
                  repeats: int = 2, vocab_size: int = 1024) -> dict[str, list[float]]:
    """Tokens/s of preparing corpus (a folder of .jsonl) with Ray Data held to each CPU
    count, the counts alternated `repeats` times so that drift cancels, and of the same
    tokenizer's encode_batch over the same documents in this process ('hf', between the
    rounds; HF spreads a batch over its own threads). Ray must be up. The bpe tokenizer is
    trained once, before any timing."""
    from raypar.data.prepare import prepare_dataset
    cfg = DataConfig(path=str(corpus), tokenizer="bpe", vocab_size=vocab_size,
                     val_fraction=0.05, dataset_dir=str(cache / "prepared"))
    tok = prepare_dataset(cfg, cache).tokenizer  # trains the tokenizer (untimed)
    texts = [json.loads(line)["text"] for f in sorted(corpus.glob("*.jsonl"))
             for line in f.read_text().splitlines()]
    rates: dict[str, list[float]] = {f"ray_{n}cpu": [] for n in cpus}
    rates["hf"] = []
    for _ in range(repeats):
        for n in cpus:
            tokens, seconds = _prepare_once(cfg, cache, n)
            rates[f"ray_{n}cpu"].append(tokens / seconds)
        t0 = time.perf_counter()
        encoded = tok.hf.encode_batch(texts, add_special_tokens=False)
        seconds = time.perf_counter() - t0
        rates["hf"].append(sum(len(e.ids) for e in encoded) / seconds)
    return rates
