"""Corpus readers, tokenizers, the Ray Data preparation that writes a corpus as token
shards (a prepared dataset), and the global block order.

    from raypar.data import prepare_dataset, prepare_corpus, global_batch_indices, rank_slice

The names are imported on first use (PEP 562): a training worker imports raypar.data.blocks
and never pays for the preparation's imports (Ray Data, pandas, the tokenizers library).
"""
import importlib

_WHERE = {
    "is_validation": "corpus", "resolve_format": "corpus", "resolve_sources": "corpus",
    "block_order": "packing", "global_batch_indices": "packing", "pack": "packing",
    "rank_slice": "packing", "stream_indices": "packing", "token_dtype": "packing",
    "PreparedCorpus": "pipeline", "default_cache_dir": "pipeline", "prepare_corpus": "pipeline",
    "PreparedDataset": "prepare", "is_prepared": "prepare", "prepare_dataset": "prepare",
    "EOT": "tokenizer", "Tokenizer": "tokenizer", "build_tokenizer": "tokenizer",
    "train_bpe": "tokenizer",
}
__all__ = sorted(_WHERE)


def __getattr__(name: str):
    if name not in _WHERE:
        raise AttributeError(f"module 'raypar.data' has no attribute {name!r}")
    return getattr(importlib.import_module(f"raypar.data.{_WHERE[name]}"), name)
