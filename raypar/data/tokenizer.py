"""Tokenizers: raw bytes, or a HF `tokenizers` BPE trained on the corpus and cached.

    tok = Tokenizer.byte_level()
    assert tok.decode(tok.encode("héllo")) == "héllo"

Every tokenizer serialises to one JSON string, so it travels to Ray Data tasks
as plain data, is stored in a prepared dataset's manifest, and its hash is part of the
dataset's key. That string is a Hugging Face `tokenizer.json` for every kind (the byte
tokenizer is written as a byte-level BPE without merges whose ids are the bytes), so
`tokenizers.Tokenizer.from_file` and transformers' `PreTrainedTokenizerFast` read what
raypar writes; the byte tokenizer's older `{"raypar_tokenizer": "byte"}` form still reads.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import sys
import time
from pathlib import Path
from typing import Callable, Iterable, Iterator, Optional

import numpy as np
from tokenizers import AddedToken
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from raypar.config import ConfigError, DataConfig
from raypar.data.corpus import corpus_fingerprint

log = logging.getLogger("raypar.data")

EOT = "<|endoftext|>"
# Tokenizers from elsewhere name their end-of-text token differently; the first found wins.
_EOT_CANDIDATES = (EOT, "<|end_of_text|>", "</s>", "<eos>", "<|eos|>")
_BYTE_KIND = "byte"
# What the byte tokenizer was saved as before it became a HF tokenizer.json. Its sha256
# stays the byte tokenizer's digest, so the datasets and caches keyed by it before keep
# their keys, and an old and a new byte tokenizer compare as the same one.
_LEGACY_BYTE_JSON = json.dumps({"raypar_tokenizer": _BYTE_KIND, "vocab_size": 257, "eot_id": 256})


def _bytes_to_unicode() -> dict[int, str]:
    """The printable character HF's ByteLevel pre-tokenizer stands each byte for (GPT-2's
    table): printable Latin-1 bytes are themselves, the others take code points from 256 up
    in byte order."""
    keep = {*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)}
    table, extra = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def _byte_hf() -> HFTokenizer:
    """The byte tokenizer as a HF tokenizer: ByteLevel turns the text's UTF-8 bytes into one
    symbol each (no regex split, no prefix space), a BPE without merges maps symbol b to id
    b, and the end-of-text token is the special id 256. Its ids equal the byte kind's for any
    text that does not spell the end-of-text token itself (raypar's byte encoder reads that
    as bytes: tokenizer_config.json's split_special_tokens does the same in transformers)."""
    vocab = {ch: b for b, ch in _bytes_to_unicode().items()}
    hf = HFTokenizer(models.BPE(vocab=vocab, merges=[]))
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    hf.decoder = decoders.ByteLevel()
    hf.add_special_tokens([AddedToken(EOT, special=True, normalized=False)])
    return hf


_BYTE_HF_JSON: Optional[str] = None


def _byte_hf_json() -> str:
    global _BYTE_HF_JSON
    if _BYTE_HF_JSON is None:
        _BYTE_HF_JSON = _byte_hf().to_str()
    return _BYTE_HF_JSON


class Tokenizer:
    """Byte-level (ids 0..255 are bytes, 256 is end-of-text) or a wrapped HF tokenizer."""

    def __init__(self, hf: Optional[HFTokenizer] = None, eot_id: Optional[int] = None):
        self._hf = hf
        if hf is None:
            self.kind, self.eot_id, self.vocab_size = _BYTE_KIND, 256, 257
        else:
            self.kind = "hf"
            self.vocab_size = hf.get_vocab_size(with_added_tokens=True)
            self.eot_id = eot_id if eot_id is not None else _find_eot(hf)

    @classmethod
    def byte_level(cls) -> "Tokenizer":
        return cls()

    @property
    def hf(self) -> Optional[HFTokenizer]:
        """The wrapped HF tokenizers.Tokenizer (None for the byte-level one)."""
        return self._hf

    def to_hf(self) -> HFTokenizer:
        """A HF tokenizers.Tokenizer with this one's ids, for every kind (a new object)."""
        return _byte_hf() if self._hf is None else HFTokenizer.from_str(self._hf.to_str())

    @property
    def eot_token(self) -> str:
        """The end-of-text token's text (what HF calls the eos token)."""
        return EOT if self._hf is None else self._hf.id_to_token(self.eot_id)

    def encode(self, text: str) -> list[int]:
        if self._hf is None:
            return list(text.encode("utf-8"))
        return self._hf.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        if self._hf is None:
            return [list(t.encode("utf-8")) for t in texts]
        return [e.ids for e in self._hf.encode_batch(texts, add_special_tokens=False)]

    def encode_flat(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """All texts' ids concatenated (int32) and the len(texts)+1 offsets into them:
        the layout of an Arrow list column, built without a Python int per token."""
        if self._hf is None:
            encoded = [t.encode("utf-8") for t in texts]
            values = np.frombuffer(b"".join(encoded), dtype=np.uint8).astype(np.int32)
            lengths = [len(b) for b in encoded]
        else:
            ids = self.encode_batch(texts)
            lengths = [len(i) for i in ids]
            values = np.fromiter((t for i in ids for t in i), dtype=np.int32,
                                 count=sum(lengths))
        offsets = np.zeros(len(texts) + 1, dtype=np.int32)
        np.cumsum(lengths, out=offsets[1:])
        return values, offsets

    def decode(self, ids: Iterable[int]) -> str:
        ids = [int(i) for i in ids]
        if self._hf is None:
            # The eot id has no byte; it reads back as its name, as in the HF tokenizers.
            parts, start = [], 0
            for k, i in enumerate(ids + [self.eot_id]):
                if i >= 256:
                    parts.append(bytes(ids[start:k]).decode("utf-8", errors="replace"))
                    start = k + 1
            return EOT.join(parts)
        return self._hf.decode(ids, skip_special_tokens=False)

    def to_json(self) -> str:
        """A HF tokenizer.json (for every kind)."""
        return _byte_hf_json() if self._hf is None else self._hf.to_str()

    @classmethod
    def from_json(cls, text: str, where: str = "data.tokenizer: the tokenizer") -> "Tokenizer":
        """Parse to_json's output or a HF tokenizer.json; `where` names the source in the
        ConfigError for a tokenizer without an end-of-text token."""
        head = text.lstrip()[:200]
        if '"raypar_tokenizer"' in head:  # the byte tokenizer's older form
            obj = json.loads(text)
            if isinstance(obj, dict) and obj.get("raypar_tokenizer") == _BYTE_KIND:
                return cls()
        hf = HFTokenizer.from_str(text)
        # The byte tokenizer's own file (re-serialised, so spacing and key order do not
        # matter) is the byte kind again: its encoder needs no HF pass.
        if hf.get_vocab_size(with_added_tokens=True) == 257 and hf.to_str() == _byte_hf_json():
            return cls()
        return cls(hf, _find_eot(hf, where))

    def save(self, path: str | Path) -> None:
        _atomic_write(Path(path), self.to_json())

    @classmethod
    def from_file(cls, path: str | Path) -> "Tokenizer":
        return cls.from_json(Path(path).read_text(encoding="utf-8"))

    @property
    def digest(self) -> str:
        """sha256 of the serialised tokenizer: its identity in cache keys, and what says two
        tokenizers are the same one (the byte kind keeps its older form's)."""
        text = _LEGACY_BYTE_JSON if self._hf is None else self.to_json()
        return hashlib.sha256(text.encode("utf-8")).hexdigest()

    def __repr__(self) -> str:
        return f"Tokenizer(kind={self.kind!r}, vocab_size={self.vocab_size}, eot_id={self.eot_id})"


def _find_eot(hf: HFTokenizer, where: str = "data.tokenizer: the tokenizer") -> int:
    for name in _EOT_CANDIDATES:
        tid = hf.token_to_id(name)
        if tid is not None:
            return tid
    raise ConfigError(f"{where} has no end-of-text token; "
                      f"expected one of {', '.join(_EOT_CANDIDATES)}")


def parse_tokenizer(text: str, where: str) -> Tokenizer:
    """The tokenizer a JSON text holds, or a ConfigError that starts with `where` (the
    field or file it came from) and says what is wrong, in one line."""
    try:
        return Tokenizer.from_json(text, where)
    except ConfigError:
        raise
    except Exception as e:  # tokenizers raises a bare Exception for JSON it cannot use
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ConfigError(f"{where} is not a valid tokenizer ({first})") from None


def _atomic_write(path: Path, text: str) -> None:
    # Write then rename: a run killed mid-write, or two runs racing, never leave
    # a half-written file where the cache expects a whole one.
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def train_bpe(texts: Iterator[str], vocab_size: int) -> Tokenizer:
    """A GPT-2 style byte-level BPE: every byte is in the alphabet, so no text is unknown."""
    hf = HFTokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    # On a terminal HF shows its own bars for counting pairs and merging.
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=[EOT], show_progress=sys.stderr.isatty(),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    hf.train_from_iterator(texts, trainer)
    return Tokenizer(hf)


def _shown(texts: Iterator[str], budget: int) -> Iterator[str]:
    """texts, with the share of the sample read so far on stderr: a line redrawn every
    second on a terminal, a plain line every 10 s otherwise (reading the sample is most
    of a bpe tokenizer's training time)."""
    tty = sys.stderr.isatty()
    every, read = (1.0 if tty else 10.0), 0
    started = last = now = time.monotonic()
    for text in texts:
        read += len(text.encode("utf-8"))
        now = time.monotonic()
        if now - last >= every:
            last = now
            line = (f"raypar: tokenizer: reading the bpe sample, {read / 1e6:.1f} of at most "
                    f"{budget / 1e6:.1f} MB, {now - started:.0f} s")
            print(f"\r{line}\033[K" if tty else line, end="" if tty else "\n",
                  file=sys.stderr, flush=True)
        yield text
    if tty and now - started >= every:
        print("\r\033[K", end="", file=sys.stderr, flush=True)


def bpe_sample(cfg: DataConfig) -> str:
    """Which text the bpe tokenizer trains on: part of its cache key."""
    return (f"the training documents in document order, the first "
            f"{cfg.tokenizer_sample_bytes} bytes of their UTF-8 text")


def build_tokenizer(cfg: DataConfig, sources: list[str], cache_dir: Path,
                    text_iter_factory: Callable[[], Iterator[str]],
                    fingerprint: Optional[str] = None) -> Tokenizer:
    """The tokenizer cfg.tokenizer names: 'byte', 'bpe' (trained once per corpus and
    cached under cache_dir/tokenizers), or a path to a tokenizer.json.

    text_iter_factory() yields the text a bpe tokenizer trains on (bpe_sample(cfg): at
    most data.tokenizer_sample_bytes of the training documents, never the whole corpus);
    it is called only when one must be trained. `fingerprint` saves re-listing the sources.
    """
    if cfg.tokenizer == _BYTE_KIND:
        return Tokenizer.byte_level()
    if cfg.tokenizer == "bpe":
        fp = fingerprint or corpus_fingerprint(sources, cfg)
        text = f"{fp}\nbpe vocab_size={cfg.vocab_size}\nsample: {bpe_sample(cfg)}"
        key = hashlib.sha256(text.encode()).hexdigest()
        path = Path(cache_dir) / "tokenizers" / f"bpe-{key[:24]}.json"
        if path.is_file():
            return Tokenizer.from_file(path)
        started = time.monotonic()
        tok = train_bpe(_shown(text_iter_factory(), cfg.tokenizer_sample_bytes), cfg.vocab_size)
        log.info("trained the bpe tokenizer (vocab_size %d) on %s, in %.1f s", cfg.vocab_size,
                 bpe_sample(cfg), time.monotonic() - started)
        try:
            tok.save(path)
        except OSError as e:  # pipeline.check_cache_dir looked first; the disk may have filled
            raise ConfigError(f"data.cache_dir: cannot write {path} ({e.strerror or e}); set "
                              f"data.cache_dir to a writable directory") from None
        return tok
    return _user_file(cfg.tokenizer)


def _user_file(name: str) -> Tokenizer:
    """The tokenizer.json file data.tokenizer names, or one line saying what is wrong."""
    path = Path(name).expanduser()
    if not path.is_file():
        raise ConfigError(f"data.tokenizer: no such file: {path}")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"data.tokenizer: cannot read {path} ({e})") from None
    return parse_tokenizer(text, f"data.tokenizer: {path}")


def padded_vocab(n: int, tp: int = 1) -> int:
    """Round the tokenizer's vocabulary up to a multiple of 64 (aligned matmuls) and of tp
    (vocab-parallel embedding and loss). The extra ids never occur in the data."""
    multiple = math.lcm(64, tp)
    return -(-n // multiple) * multiple


def expected_vocab(cfg: DataConfig) -> int:
    """The vocabulary size data.tokenizer will have, known before the tokenizer is built
    (before Ray starts: the memory check needs it). A data.path that is a prepared
    dataset brings its own tokenizer: its manifest says."""
    from raypar.data import prepare  # (prepare imports this module)
    path = str(cfg.sources[0]["path"]) if cfg.sources else cfg.path  # a mixture: the first's
    if prepare.is_prepared(path):
        return int(prepare.given_manifest(path)["vocab_size"])
    if cfg.tokenizer == "byte":
        return 257
    if cfg.tokenizer == "bpe":
        return cfg.vocab_size
    return _user_file(cfg.tokenizer).vocab_size
