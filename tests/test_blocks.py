"""Block sources (data/blocks.py) and the trainer reading through them: a rank trained on a
prepared dataset's shards equals one trained on the packed array, bit for bit; it reads
only its own blocks, fetched ahead on a background thread. Unit tests: one process, gloo
over a FileStore, no Ray."""
import json
import threading
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch.distributed as dist

from raypar.config import load_spec
from raypar.data.blocks import (PREFETCH_STEPS, ArrayBlocks, DatasetBlocks, Prefetcher,
                                as_source, open_splits)
from raypar.data.order import BlockOrder, rank_blocks
from raypar.data.packing import pack, rank_slice
from raypar.data.shards import TokenDataset, read_manifest, write_manifest, write_shard
from raypar.data.tokenizer import padded_vocab
from raypar.errors import ConfigError
from raypar.train.trainer import RankTrainer

ROOT = Path(__file__).resolve().parent.parent
EOT, VOCAB, SEQ_LEN = 256, 257, 16
# Documents per train shard: mostly a few short ones (so blocks straddle shard boundaries
# all the time), some empty shards, and enough shards that two steps read only some.
TRAIN_SHARDS = [3, 2, 0, 3, 1, 4, 0, 0, 2, 3] * 5
VAL_SHARDS = [4, 0, 5]


def _spec(*overrides):
    return load_spec(ROOT / "jobs" / "configs" / "tiny.yaml", [
        "parallel.dp=1", f"data.seq_len={SEQ_LEN}", "train.steps=16", "train.eval_every=8",
        "train.eval_batches=2", "train.log_blocks=true", "model.n_layer=1", *overrides])


def _write(root: Path, seed: int = 0) -> dict:
    """A prepared dataset at root; returns {split: the packed array of its blocks}."""
    rng = np.random.default_rng(seed)
    infos, packed = {}, {}
    for split, layout in (("train", TRAIN_SHARDS), ("val", VAL_SHARDS)):
        parts = [[rng.integers(0, EOT, size=int(rng.integers(0, 40))) for _ in range(n)]
                 for n in layout]
        infos[split] = [write_shard(root, i, docs, np.uint16, eot_id=EOT, split=split)
                        for i, docs in enumerate(parts)]
        packed[split] = pack([d for docs in parts for d in docs], EOT, SEQ_LEN + 1, VOCAB)
    write_manifest(root, infos, {"vocab_size": VOCAB, "eot_id": EOT, "fingerprint": "test",
                                 "tokenizer": json.dumps({"kind": "byte"})})
    return packed


@pytest.fixture
def corpus(tmp_path):
    root = tmp_path / "dataset"
    return root, _write(root)


@pytest.fixture
def world(tmp_path):
    """This process as a world of one (gloo), as tests/conftest.py single_process_rows."""
    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1),
                            rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def _train(trainer: RankTrainer, steps: int, after_step=None) -> list:
    rows = []
    try:
        while trainer.step < steps:
            row = trainer.train_step()
            if trainer.eval_due():
                row.val_loss = trainer.evaluate()
            rows.append(row)
            if after_step is not None:
                after_step(trainer, row)
    finally:
        trainer.close()
    return rows


def _fetches_by_thread(source: DatasetBlocks, calls: list) -> None:
    """Record (thread name, shard) of every shard fetch or verification of source."""
    original = source.dataset._local_file

    def local_file(s):
        calls.append((threading.current_thread().name, s))
        return original(s)
    source.dataset._local_file = local_file


# ---------------------------------------------------------------- the dataset itself


def test_the_dataset_holds_the_packed_blocks(corpus):
    root, packed = corpus
    train, val = open_splits(str(root), SEQ_LEN)
    assert isinstance(train, DatasetBlocks) and isinstance(val, DatasetBlocks)
    assert train.n_blocks == len(packed["train"]) and val.n_blocks == len(packed["val"])
    every = np.arange(train.n_blocks)
    assert np.array_equal(train.blocks(every), packed["train"])
    assert np.array_equal(val.blocks(np.arange(val.n_blocks)), packed["val"])
    straddle = [b for b in every if len(train.shards([b])) > 1]
    assert len(straddle) > 20  # blocks that read two or more shards
    assert len(train.shards(every)) == sum(1 for n in TRAIN_SHARDS if n)  # empty ones never


# ---------------------------------------------------------------- array or dataset: one run


@pytest.mark.parametrize("cached", [False, True])
def test_dataset_and_array_train_identically(corpus, world, tmp_path, cached):
    root, packed = corpus
    spec = _spec()
    vocab = padded_vocab(VOCAB)
    ref = _train(RankTrainer(spec, vocab, packed["train"], packed["val"]), spec.train.steps)
    cache = str(tmp_path / "cache") if cached else None
    train, val = open_splits(str(root), SEQ_LEN, cache_dir=cache)
    got = _train(RankTrainer(spec, vocab, train, val), spec.train.steps)

    def key(rows):
        return [(r.step, r.loss, r.grad_norm, r.val_loss, r.blocks, r.first_block,
                 r.last_block) for r in rows]
    assert key(got) == key(ref)  # bit for bit: the same floats, not close ones
    assert [r.step for r in got if r.val_loss is not None] == [8, 16]
    # The order is order.py's: step s reads positions [s*G, (s+1)*G), across epochs
    # (16 steps of 8 blocks exceed one epoch of this corpus).
    g, n = spec.train.global_batch, len(packed["train"])
    assert spec.train.steps * g > n
    order = BlockOrder(n, spec.train.seed)
    assert [r.blocks for r in got] == [order.blocks(s * g, g).tolist()
                                       for s in range(spec.train.steps)]
    assert all(r.data_s > 0 for r in got)
    if cached:
        shas = {s["sha256"] for s in read_manifest(root)["splits"]["train"]["shards"]
                if s["tokens"]}
        assert shas <= {p.stem for p in (tmp_path / "cache").glob("*.tok")}


def test_a_trainer_still_takes_arrays(world, corpus):
    root, packed = corpus
    spec = _spec()
    trainer = RankTrainer(spec, padded_vocab(VOCAB), packed["train"], packed["train"][:0])
    try:
        assert isinstance(trainer.train_data, ArrayBlocks) and not trainer.eval_due()
        assert trainer.train_data.n_blocks == len(packed["train"])
        trainer.train_step()
        assert trainer._train_feed._thread is None  # nothing to fetch: no thread
    finally:
        trainer.close()
    with pytest.raises(ValueError, match="seq_len"):
        RankTrainer(_spec("data.seq_len=8"), padded_vocab(VOCAB), packed["train"],
                    packed["val"])


# ---------------------------------------------------------------- reading ahead


def test_prefetch_fetches_the_next_steps_and_only_those(corpus, world, tmp_path):
    root, _ = corpus
    spec = _spec("train.global_batch=4", "train.micro_batch=2")
    cache = tmp_path / "cache"
    train, val = open_splits(str(root), SEQ_LEN, cache_dir=str(cache))
    calls: list = []
    _fetches_by_thread(train, calls)
    _fetches_by_thread(val, calls)
    trainer = RankTrainer(spec, padded_vocab(VOCAB), train, val)
    g, non_empty = spec.train.global_batch, sum(1 for n in TRAIN_SHARDS if n)
    held = []

    def check(trainer, row):
        assert trainer._train_feed.idle(timeout=60)
        upcoming = np.concatenate([trainer._my_indices(trainer.position + k * g)
                                   for k in range(PREFETCH_STEPS)])
        need = train.shards(upcoming)
        # Mapped: exactly the next steps' shards, each in the cache (a verified copy).
        assert train.dataset.mapped() == need
        cached = {p.stem for p in cache.glob("*.tok")}
        assert {train.dataset.shards[s]["sha256"] for s in need} <= cached
        assert row.data_s > 0
        held.append(len(need))

    rows = _train(trainer, 12, check)
    assert len(rows) == 12 and rows[7].val_loss is not None  # evaluated at step 8
    # A rank holds a few steps' shards, never the split.
    assert max(held) <= PREFETCH_STEPS * g * 2 < non_empty
    # Every fetch ran on a prefetch thread: no step waited on its own download.
    assert calls and {name for name, _ in calls} == {"raypar-prefetch-train",
                                                     "raypar-prefetch-val"}
    assert not trainer._train_feed._thread.is_alive()  # closed


def test_a_resumed_trainer_prefetches_from_its_position(corpus, world, tmp_path):
    root, _ = corpus
    spec = _spec()
    train, val = open_splits(str(root), SEQ_LEN, cache_dir=str(tmp_path / "cache"))
    trainer = RankTrainer(spec, padded_vocab(VOCAB), train, val)
    try:
        trainer.position = 40 * spec.train.global_batch  # as load() leaves it
        trainer.prefetch()
        assert trainer._train_feed.idle(timeout=60)
        want = train.shards(np.concatenate([trainer._my_indices(trainer.position + k * 8)
                                            for k in range(PREFETCH_STEPS)]))
        assert train.dataset.mapped() == want
        row = trainer.train_step()
        assert row.first_block == BlockOrder(train.n_blocks, spec.train.seed).blocks(320, 1)[0]
    finally:
        trainer.close()


def test_a_replica_reads_its_own_slice():
    """dp ranks' indices, for training and validation, are their rank_slice of the global
    batch, computed from their own positions only (no one builds another's share)."""
    n, g = 97, 12
    order = BlockOrder(n, seed=3)
    for dp in (1, 2, 3, 4, 6):
        for pos in (0, 84, 96, 97 * 5 - 5, 10**6):
            batch = order.blocks(pos, g)
            shares = [rank_blocks(order, pos, g, r, dp) for r in range(dp)]
            assert all(np.array_equal(s, rank_slice(batch, r, dp)) for r, s in enumerate(shares))
            assert np.array_equal(np.concatenate(shares), batch)
        spec = _spec(f"train.global_batch={g}")
        for r in range(dp):
            fake = SimpleNamespace(spec=spec, pm=SimpleNamespace(dp=dp, coords=SimpleNamespace(dp=r)),
                                   val_data=SimpleNamespace(n_blocks=7), order=order)
            for b in range(3):
                want = rank_slice(np.arange(b * g, (b + 1) * g) % 7, r, dp)
                assert np.array_equal(RankTrainer._val_indices(fake, b), want)
            assert np.array_equal(RankTrainer._my_indices(fake, 24), rank_slice(
                order.blocks(24, g), r, dp))
    with pytest.raises(ValueError, match="equal slice"):
        rank_blocks(order, 0, 10, 0, 4)


# ---------------------------------------------------------------- faults


@pytest.mark.parametrize("cached", [False, True])
def test_a_tampered_shard_fails_the_step_that_reads_it(corpus, world, tmp_path, cached):
    root, packed = corpus
    spec = _spec()
    g, n = spec.train.global_batch, len(packed["train"])
    first = BlockOrder(n, spec.train.seed).blocks(0, g)
    ds = TokenDataset.open(root)
    victim = ds.shards_for(first, SEQ_LEN)[0]  # step 1 reads it
    name = ds.shards[victim]["name"]
    data = bytearray((root / name).read_bytes())
    data[1] ^= 0x01  # the same size: only the checksum tells
    (root / name).write_bytes(bytes(data))
    from raypar.train.loop import data_sources  # what a worker runs
    config = {"dataset": {"path": str(root),
                          "cache_dir": str(tmp_path / "cache") if cached else None}}
    train, val = data_sources(config, SEQ_LEN)  # opening checks sizes, not contents
    trainer = RankTrainer(spec, padded_vocab(VOCAB), train, val)
    try:
        with pytest.raises(ConfigError, match="sha256") as err:
            trainer.train_step()
        text = str(err.value)
        assert name in text and "\n" not in text, text
        assert trainer.step == 0
    finally:
        trainer.close()
    if cached:  # nothing of the bad copy is left in the cache
        sha = ds.shards[victim]["sha256"]
        assert not (tmp_path / "cache" / f"{sha}.tok").exists()


def test_worker_config_is_checked(corpus):
    from raypar.train.loop import data_sources
    root, _ = corpus
    with pytest.raises(ValueError, match="needs 'path'"):
        data_sources({"dataset": {"path": str(root), "cache": "/tmp"}}, SEQ_LEN)
    with pytest.raises(ValueError, match="needs 'path'"):
        data_sources({"dataset": {}}, SEQ_LEN)
    with pytest.raises(ConfigError, match="no manifest.json"):
        data_sources({"dataset": {"path": str(root / "nowhere")}}, SEQ_LEN)
    train, val = data_sources({"dataset": {"path": str(root), "cache_bytes": 1 << 20}}, SEQ_LEN)
    assert train.dataset.cache_bytes == 1 << 20 and val.dataset.split == "val"


def test_a_dataset_without_val_has_an_empty_one(tmp_path):
    info = write_shard(tmp_path, 0, [np.arange(100)], np.uint16, eot_id=EOT)
    write_manifest(tmp_path, [info], {"vocab_size": VOCAB, "eot_id": EOT, "fingerprint": "f",
                                      "tokenizer": "{}"})
    train, val = open_splits(str(tmp_path), SEQ_LEN)
    assert train.n_blocks == 101 // (SEQ_LEN + 1) and val.n_blocks == 0
    assert val.blocks([]).shape == (0, SEQ_LEN + 1)


# ---------------------------------------------------------------- the pieces


def test_sources_and_their_checks():
    blocks = np.arange(30, dtype=np.uint16).reshape(6, 5)
    src = as_source(blocks, 4)
    assert isinstance(src, ArrayBlocks) and len(src) == 6 and src.seq_len == 4
    assert as_source(src) is src
    assert np.array_equal(src.blocks([5, 0, 5]), blocks[[5, 0, 5]])
    src.prefetch([1]), src.retain([])  # no-ops
    with pytest.raises(ValueError, match="seq_len 4"):
        as_source(blocks, 8)
    with pytest.raises(ValueError, match="shape"):
        ArrayBlocks(np.arange(5))


def test_prefetcher_reads_in_plan_order_and_survives_failures(corpus):
    root, packed = corpus
    train, _ = open_splits(str(root), SEQ_LEN)
    feed = Prefetcher(train, "test-prefetch")
    fetched, gate = [], threading.Event()
    original = train.prefetch

    def slow_prefetch(indices):
        gate.wait(10)
        fetched.append(indices.tolist())
        if indices[0] == 7:
            raise OSError("network down")  # left to the read
        original(indices)
    train.prefetch = slow_prefetch
    try:
        feed.plan([0, 1, 2], lambda k: np.array([7 * k, 7 * k + 1]))
        assert not feed.idle(timeout=0.05)
        got: list = []
        reader = threading.Thread(target=lambda: got.append(feed.read(1, [7, 8])))
        reader.start()
        reader.join(0.2)
        assert reader.is_alive()  # waits for read 1's prefetch
        gate.set()
        reader.join(10)
        assert np.array_equal(got[0], packed["train"][[7, 8]])  # read itself after the failure
        assert feed.idle(timeout=10)
        assert fetched == [[0, 1], [7, 8], [14, 15]]
        feed.plan([0, 1, 2], lambda k: pytest.fail("the same plan is not computed again"))
        feed.plan([2, 3], lambda k: np.array([7 * k, 7 * k + 1]))  # 2 is done: fetch 3 only
        assert feed.idle(timeout=10) and fetched[3:] == [[21, 22]]
        assert train.dataset.mapped() == train.shards([14, 15, 21, 22])  # the rest let go
    finally:
        feed.close()
    assert np.array_equal(feed.read(9, [3]), packed["train"][[3]])  # closed: reads directly
