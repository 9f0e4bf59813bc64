"""The datasets a run reads: data.path's one, or the sources of a mixture (data.sources).

    datasets = prepare_all(spec.data, cache)        # one PreparedDataset per source
    blocks_of(datasets, spec.data, seq_len)         # (train blocks, val blocks), checked

A mixture's sources are each a prepared dataset directory or a corpus (prepared here, like
data.path, into the cache). They share one tokenizer: data.tokenizer when it is 'byte' or
a file; with 'bpe' (the default) the first source's, trained on it or brought by it when
it is prepared, and every later source is tokenized with that one (a prepared one must
have been written with it). Errors name the source: data.sources[i].path.

Which source each global block comes from is decided by the block order
(raypar/data/order.py: MixtureOrder), read by the workers (raypar/data/blocks.py).
"""
from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Callable, Optional

from raypar.config import ConfigError, DataConfig
from raypar.data import pipeline, prepare
from raypar.data.corpus import check_not_empty, file_stats, resolve_sources


def source_configs(cfg: DataConfig) -> list[tuple[str, DataConfig]]:
    """(field name, DataConfig of that one corpus) for each dataset the run reads:
    ('data.path', cfg) without a mixture, ('data.sources[i].path', ...) for each source."""
    if not cfg.sources:
        return [("data.path", cfg)]
    return [(f"data.sources[{i}].path", dataclasses.replace(cfg, path=str(s["path"]),
                                                            sources=[]))
            for i, s in enumerate(cfg.sources)]


def _renamed(field_name: str, e: ConfigError) -> ConfigError:
    """An error about data.path, told of the source it concerns."""
    if field_name == "data.path":
        return e
    return ConfigError(re.sub(r"^data\.path\b", field_name, str(e)))


def precheck(cfg: DataConfig, cache: Optional[Path] = None) -> None:
    """What can be refused before Ray starts: every corpus exists and is not empty, and the
    cache can be written (a prepared dataset only needs the shard cache)."""
    for field_name, one in source_configs(cfg):
        try:
            if prepare.is_prepared(one.path):  # only read (its shards are checked then)
                continue
            sources = resolve_sources(one.path, one.format)
            stats = file_stats(sources)
            check_not_empty(sources, stats)
            pipeline.check_cache_dir(one, sources, stats, cache)
        except ConfigError as e:
            raise _renamed(field_name, e) from None


def ready(cfg: DataConfig, cache: Path) -> bool:
    """Whether prepare_all would only read: every dataset is prepared or finished in the
    cache. (A mixture's corpus after the first is tokenized with the first's tokenizer,
    known only once that exists: such a mixture counts as not ready.)"""
    for i, (_, one) in enumerate(source_configs(cfg)):
        if prepare.is_prepared(one.path):
            continue
        if i > 0 and cfg.tokenizer == "bpe":
            return False
        sources = resolve_sources(one.path, one.format)
        if not prepare.lookup(one, sources, file_stats(sources), cache):
            return False
    return True


def prepare_all(cfg: DataConfig, cache: Optional[Path] = None, *,
                progress: Optional[Callable[[dict], None]] = None,
                progress_every: float = prepare.PROGRESS_EVERY_S,
                force: bool = False) -> list[prepare.PreparedDataset]:
    """The prepared dataset of data.path, or of each source of a mixture in order (Ray
    must be initialised by the caller when any needs work). All share one tokenizer."""
    out: list[prepare.PreparedDataset] = []
    tokenizer = cfg.tokenizer
    for field_name, one in source_configs(cfg):
        try:
            # A prepared source brings its tokenizer (checked below); a corpus is tokenized
            # with the mixture's.
            own = one.tokenizer if prepare.is_prepared(one.path) else tokenizer
            ds = prepare.prepare_dataset(dataclasses.replace(one, tokenizer=own), cache,
                                         progress=progress, progress_every=progress_every,
                                         force=force)
        except ConfigError as e:
            raise _renamed(field_name, e) from None
        if out and ds.tokenizer.digest != out[0].tokenizer.digest:
            first = out[0].tokenizer
            raise ConfigError(
                f"{field_name}: {one.path} was prepared with another tokenizer "
                f"({ds.tokenizer.kind}, {ds.tokenizer.vocab_size} tokens) than "
                f"data.sources[0] ({first.kind}, {first.vocab_size} tokens); a mixture "
                f"reads one tokenizer: prepare it again with data.tokenizer set to the first "
                f"source's tokenizer.json")
        later_corpora = any(not prepare.is_prepared(str(s["path"])) for s in cfg.sources[1:])
        if not out and later_corpora and tokenizer == "bpe":
            tokenizer = _as_file(ds.tokenizer, cache or pipeline.default_cache_dir(cfg))
        out.append(ds)
    return out


def _as_file(tok, cache: Path) -> str:
    """The first source's tokenizer as a file, which data.tokenizer accepts, for the later
    corpora to be tokenized with: under the cache, named by its digest."""
    path = cache / "tokenizers" / f"mixture-{tok.digest[:16]}.json"
    try:
        if not path.is_file():
            path.parent.mkdir(parents=True, exist_ok=True)
            tok.save(path)
    except OSError as e:
        raise ConfigError(f"data.cache_dir: cannot write {path} ({e.strerror or e}); set "
                          f"data.cache_dir to a writable directory") from None
    return str(path)


def blocks_of(datasets: list[prepare.PreparedDataset], cfg: DataConfig,
              seq_len: int) -> tuple[int, int]:
    """(train blocks, val blocks) over all datasets at this seq_len, in one line naming the
    field when a corpus holds none (a mixture's source needs train blocks; its validation
    may be empty when another source has some)."""
    if not cfg.sources:
        return datasets[0].check_blocks(seq_len)
    n_train = n_val = 0
    for (field_name, one), ds in zip(source_configs(cfg), datasets):
        n = ds.n_blocks("train", seq_len)
        if n == 0:
            raise ConfigError(f"{field_name}: {one.path} holds {ds.tokens('train')} training "
                              f"tokens, not one block of data.seq_len + 1 = {seq_len + 1}; "
                              f"lower data.seq_len or leave this source out")
        n_train, n_val = n_train + n, n_val + ds.n_blocks("val", seq_len)
    return n_train, n_val


def worker_dataset(datasets: list[prepare.PreparedDataset], cfg: DataConfig,
                   shard_cache: Callable[[str], Optional[str]]) -> dict:
    """What each worker opens (raypar/train/loop.py: data_sources): a path, or the sources
    with their weights and names; shard_cache(path) is where a remote dataset's shards are
    kept (None: read in place). Each remote source of a mixture has a cache folder of its
    own, so that each keeps its own size bound."""
    if not cfg.sources:
        return {"path": datasets[0].path, "cache_dir": shard_cache(datasets[0].path)}

    def cache_of(path: str, name: str) -> Optional[str]:
        base = shard_cache(path)
        return None if base is None else str(Path(base) / name)

    return {"sources": [{"path": ds.path, "weight": float(s["weight"]), "name": s["name"],
                         "cache_dir": cache_of(ds.path, s["name"])}
                        for ds, s in zip(datasets, cfg.sources)]}
