"""Corpus readers, tokenizers, the Ray Data preparation that writes a corpus as token
shards (a prepared dataset), and the global block order.

    from raypar.data import prepare_dataset, prepare_corpus, global_batch_indices, rank_slice
"""
from raypar.data.corpus import is_validation, resolve_format, resolve_sources
from raypar.data.packing import (block_order, global_batch_indices, pack, rank_slice,
                                 stream_indices, token_dtype)
from raypar.data.pipeline import PreparedCorpus, default_cache_dir, prepare_corpus
from raypar.data.prepare import PreparedDataset, is_prepared, prepare_dataset
from raypar.data.tokenizer import EOT, Tokenizer, build_tokenizer, train_bpe

__all__ = [
    "EOT", "PreparedCorpus", "PreparedDataset", "Tokenizer", "block_order",
    "build_tokenizer", "default_cache_dir", "global_batch_indices", "is_prepared",
    "is_validation", "pack", "prepare_corpus", "prepare_dataset", "rank_slice",
    "resolve_format", "resolve_sources", "stream_indices", "token_dtype", "train_bpe",
]
