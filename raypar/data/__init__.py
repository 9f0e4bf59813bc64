"""Corpus readers, tokenizers and the Ray Data pipeline that turns a corpus into
packed token blocks with a fixed global order (see packing.py for that order).

    from raypar.data import prepare_corpus, global_batch_indices, rank_slice
"""
from raypar.data.corpus import is_validation, resolve_format, resolve_sources
from raypar.data.packing import (block_order, global_batch_indices, pack, rank_slice,
                                 stream_indices, token_dtype)
from raypar.data.pipeline import PreparedCorpus, default_cache_dir, prepare_corpus
from raypar.data.tokenizer import EOT, Tokenizer, build_tokenizer, train_bpe

__all__ = [
    "EOT", "PreparedCorpus", "Tokenizer", "block_order", "build_tokenizer",
    "default_cache_dir", "global_batch_indices", "is_validation", "pack",
    "prepare_corpus", "rank_slice", "resolve_format", "resolve_sources", "stream_indices",
    "token_dtype", "train_bpe",
]
