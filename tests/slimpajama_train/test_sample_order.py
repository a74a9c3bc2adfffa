"""The global sample order is an O(1)-memory seeded bijection of [0, N) per epoch (a Feistel network
with cycle walking), a pure function of (N, seed, epoch); the loaders deliver it, batch by batch."""
import itertools
import json
import math
import tracemalloc
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import torch

from data_prep.shard_format import FORMAT_VERSION, MANIFEST, RecordLayout, ShardWriter, shard_name
from slimpajama_train.data.dataset import DataConfig, open_dataset
from slimpajama_train.data.loader import train_loader
from slimpajama_train.data.order import BlockShuffledOrder, GlobalSampleOrder, KeyedBijection
from slimpajama_train.data.workers import shut_down_workers

SLIMPAJAMA_SAMPLES = 300_000_000  # ~627B tokens / 2049 tokens per sample


def _epoch(order: GlobalSampleOrder, epoch: int) -> np.ndarray:
    return order.sample_ids(np.arange(epoch * order.total, (epoch + 1) * order.total))


def test_every_epoch_is_a_bijection_for_every_small_n():
    for n in range(1, 301):
        for seed, epoch in ((0, 0), (1234, 1), (2**40 + 3, 7)):
            ids = _epoch(GlobalSampleOrder([n], seed), epoch)
            assert np.array_equal(np.sort(ids), np.arange(n)), (n, seed, epoch)
        # the scalar path computes the same function as the vectorized one
        order = GlobalSampleOrder([n], 1234)
        assert [order.sample_id(p) for p in range(2 * n)] == order.sample_ids(np.arange(2 * n)).tolist()
    # the split into shards only changes locate(), not the order
    assert np.array_equal(_epoch(GlobalSampleOrder([5, 7, 3], 9), 2), _epoch(GlobalSampleOrder([15], 9), 2))


def test_epochs_and_seeds_give_other_orders_and_fresh_objects_the_same():
    for n in (10, 64, 65, 257, 1000):
        a = GlobalSampleOrder([n], 1)
        e0, e1, e2 = (_epoch(a, e) for e in range(3))
        other_seed = _epoch(GlobalSampleOrder([n], 2), 0)
        assert not np.array_equal(e0, e1) and not np.array_equal(e1, e2) and not np.array_equal(e0, other_seed)
        assert not np.array_equal(e0, np.arange(n))
        assert np.array_equal(_epoch(GlobalSampleOrder([n], 1), 1), e1)  # a fresh object: the same order
    plain = GlobalSampleOrder([4, 6], 1, shuffle=False)
    assert [plain.sample_id(p) for p in range(12)] == list(range(10)) + [0, 1]


def test_order_is_pinned():
    """Resumed runs rely on the order not changing under them: a change here reorders every run."""
    order = GlobalSampleOrder([1000], 1234)
    assert order.sample_ids(np.arange(8)).tolist() == [742, 150, 798, 901, 78, 512, 121, 831]
    assert [order.sample_id(p) for p in range(1000, 1008)] == [430, 99, 45, 919, 398, 844, 561, 612]
    big = GlobalSampleOrder([4096] * 75_000, 1234)
    assert [big.sample_id(p) for p in (0, 1, 10**9)] == [283607167, 86402717, 270278603]


def test_permutations_of_a_tiny_domain_are_uniform_over_keys():
    """Over many (seed, epoch) keys, each of the 5! orders of 5 samples is about equally likely
    (a weak round function or too few rounds skews this)."""
    counts: dict[tuple[int, ...], int] = {}
    keys = 12_000
    for k in range(keys):
        order = GlobalSampleOrder([5], seed=k // 4)
        perm = tuple(order.sample_id(5 * (k % 4) + p) for p in range(5))
        counts[perm] = counts.get(perm, 0) + 1
    expected = keys / 120
    chi2 = sum((counts.get(p, 0) - expected) ** 2 / expected for p in itertools.permutations(range(5)))
    print(f"5! orders over {keys} keys: {len(counts)} seen, chi2 = {chi2:.1f} (119 dof: mean 119, sd 15.4)")
    assert len(counts) == 120 and chi2 < 119 + 6 * 15.4


def test_slimpajama_scale_order_is_a_uniform_bijection_in_constant_memory(monkeypatch):
    order = GlobalSampleOrder([4096] * (SLIMPAJAMA_SAMPLES // 4096), seed=1234)
    n = order.total
    rng = np.random.default_rng(0)
    contiguous = np.arange(3 * n, 3 * n + 100_000)  # what one global batch after another reads
    scattered = 5 * n + np.unique(rng.integers(0, n, 100_000))
    for name, positions in (("contiguous", contiguous), ("scattered", scattered)):
        ids = order.sample_ids(positions)
        u = ids / n
        hist = np.bincount((u * 100).astype(int), minlength=100)
        e = len(ids) / 100
        chi2 = float(((hist - e) ** 2 / e).sum())
        corr = float(np.corrcoef(positions % n, ids)[0, 1])
        lag1 = float(np.corrcoef(ids[:-1], ids[1:])[0, 1])
        print(f"N={n}, {len(ids)} {name} positions: mean {u.mean():.4f} std {u.std():.4f} (uniform: 0.5, 0.2887), "
              f"chi2 {chi2:.1f} (99 dof), corr(position, id) {corr:+.4f}, lag-1 corr {lag1:+.4f}")
        assert ids.min() >= 0 and ids.max() < n
        assert len(np.unique(ids)) == len(ids)  # distinct positions of one epoch never collide
        assert abs(u.mean() - 0.5) < 0.01 and abs(u.std() - 1 / math.sqrt(12)) < 0.01
        assert chi2 < 99 + 6 * 14.1 and abs(corr) < 0.02 and abs(lag1) < 0.02
    # the same offsets in another epoch land elsewhere
    assert (order.sample_ids(contiguous) == order.sample_ids(contiguous + n)).mean() < 0.001
    # no per-sample state: a lookup far into training allocates next to nothing (a permutation: 2.4 GB)
    tracemalloc.start()
    ids = [order.sample_id(10**9 + i) for i in range(1000)]
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert len(set(ids)) == 1000

    # The work of a lookup, counted (not timed, which depends on the machine): passes through the
    # network, the same far into training as at the start, and under 2 on average (cycle walking).
    passes = 0
    feistel = KeyedBijection._feistel

    def counted(self, x):
        nonlocal passes
        passes += 1
        return feistel(self, x)

    monkeypatch.setattr(KeyedBijection, "_feistel", counted)

    def per_lookup(start: int) -> float:
        nonlocal passes
        passes = 0
        for i in range(2000):
            order.sample_id(start + i)
        return passes / 2000

    at0, at1e9 = per_lookup(0), per_lookup(10**9)
    print(f"sample_id: {at0:.3f} network passes per lookup at position 0, {at1e9:.3f} at 1e9; "
          f"traced peak of 1000 lookups {peak} bytes")
    assert peak < 256 * 1024 and 1 <= at0 < 2 and 1 <= at1e9 < 2


# ---- the loaders deliver the order ----------------------------------------------------------------
NUMBERED_BLOCK = 9
# Token offset per stored dtype: uint32 shards hold ids past uint16's range, up to just under 2**31.
NUMBERED_OFFSET = {"uint16": 60_000, "uint32": 2**31 - 1000}


def write_numbered_shards(out: Path, dtype: str, train: list[int], val: list[int] = (),
                          sources: tuple[str, ...] = ("A", "B")) -> Path:
    """Real shards (prep's format) whose sample ``g`` of a split (in shard order) holds the tokens
    ``offset + g * NUMBERED_BLOCK + [0, NUMBERED_BLOCK)``: a batch row names its sample. Validation
    shard ``k`` holds the source ``sources[k % len(sources)]`` alone."""
    out.mkdir(parents=True, exist_ok=True)
    np_dtype, offset = np.dtype(dtype), NUMBERED_OFFSET[dtype]
    splits = {}
    for split, sizes in (("train", train), ("val", val)):
        entries, g = [], 0
        for index, n in enumerate(sizes):
            writer = ShardWriter(out / shard_name(split, index), index, np_dtype)
            for _ in range(n):
                writer.add(offset + g * NUMBERED_BLOCK + np.arange(NUMBERED_BLOCK), {sources[index % len(sources)]: 1})
                g += 1
            entries.append(writer.close(NUMBERED_BLOCK))
        if entries:
            splits[split] = {"shards": entries}
    manifest = {"format_version": FORMAT_VERSION, "seq_len": NUMBERED_BLOCK - 1, "block_size": NUMBERED_BLOCK,
                "dtype": dtype, "record": asdict(RecordLayout.for_block(NUMBERED_BLOCK, np_dtype)),
                "tokenizer": {"file": "none", "sha256": "0" * 64, "vocab_size": offset + NUMBERED_BLOCK * sum(train)},
                "splits": splits}
    (out / MANIFEST).write_text(json.dumps(manifest))
    return out


def numbered_sample_ids(batch: torch.Tensor, dtype: str) -> list[int]:
    """The samples of a (B, T+1) batch of numbered shards, checking that every row is whole."""
    rows = batch.long() - NUMBERED_OFFSET[dtype]
    ids = rows[:, 0] // NUMBERED_BLOCK
    assert torch.equal(rows, ids[:, None] * NUMBERED_BLOCK + torch.arange(NUMBERED_BLOCK))
    return ids.tolist()


def _loader_steps(cfg: DataConfig, start: int, steps: int, G: int, world: int, dtype: str) -> list[list[int]]:
    """Sample ids of each global step, assembled from every rank's loader."""
    manifest, data_dir = open_dataset(cfg)
    loaders = [train_loader(cfg, manifest, data_dir, start, G, r, world) for r in range(world)]
    its = [iter(loader) for loader in loaders]
    out = []
    for _ in range(steps):
        step: list[int] = []
        for it in its:
            for _ in range(G // world // cfg.micro_batch_size):
                batch = next(it)
                expect = torch.uint16 if dtype == "uint16" else torch.int32
                assert batch.dtype == expect and batch.shape == (cfg.micro_batch_size, NUMBERED_BLOCK)
                step += numbered_sample_ids(batch, dtype)
        out.append(step)
    for loader in loaders:
        shut_down_workers(loader)
    return out


@pytest.mark.parametrize("dtype,order_name", [("uint16", "global"), ("uint32", "global"), ("uint16", "blocks")])
def test_loader_batches_follow_the_global_order_on_any_world_size_and_resume(tmp_path, dtype, order_name):
    """Global step ``s`` holds the samples at positions [s·G, (s+1)·G) of the order (``data.order``
    global, or blocks of 2 shards), whatever the world size, in the stored dtype, over epoch
    boundaries (24 samples, 8 per step), from a resume position as from the start; through loader
    workers as in process."""
    orders = {"global": dict(order="global"), "blocks": dict(order="blocks", block_shards=2)}
    cfg = DataConfig(path=str(write_numbered_shards(tmp_path / dtype, dtype, [5, 7, 3, 9])), micro_batch_size=2,
                     num_workers=0, seed=77, **orders[order_name])
    G, steps = 8, 7
    order = (GlobalSampleOrder([5, 7, 3, 9], seed=77) if order_name == "global"
             else BlockShuffledOrder([5, 7, 3, 9], seed=77, block_shards=2))
    expected = [order.sample_ids(np.arange(s * G, (s + 1) * G)).tolist() for s in range(steps)]
    assert sorted(sum(expected[:3], [])) == list(range(24))  # an epoch visits every sample once
    for world in (1, 2, 4):
        assert _loader_steps(cfg, 0, steps, G, world, dtype) == expected, world
    assert _loader_steps(cfg, 3 * G, 4, G, 2, dtype) == expected[3:]  # resume: a seek
    workers = DataConfig(path=cfg.path, micro_batch_size=2, num_workers=2, seed=77, **orders[order_name])
    assert _loader_steps(workers, G, 4, G, 2, dtype) == expected[1:5]


# ---- data.order=blocks -------------------------------------------------------------------------------
def _block_epoch(order: BlockShuffledOrder, epoch: int) -> np.ndarray:
    return order.sample_ids(np.arange(epoch * order.total, (epoch + 1) * order.total))


def test_blocks_order_is_a_bijection_per_epoch_and_a_pure_function_of_seed_epoch_and_k():
    layouts = [[5], [5, 7, 3], [5, 0, 7, 3, 9, 4], [1] * 40, [256] * 33 + [45], [0, 0, 3]]
    for counts in layouts:
        for k in (1, 2, 3, 16, 100):
            for seed, epoch in ((0, 0), (1234, 1), (2**40 + 3, 7)):
                order = BlockShuffledOrder(counts, seed, k)
                ids = _block_epoch(order, epoch)
                assert np.array_equal(np.sort(ids), np.arange(sum(counts))), (counts, k, seed, epoch)
                again = BlockShuffledOrder(counts, seed, k)  # a fresh object (another worker, a resume)
                assert np.array_equal(_block_epoch(again, epoch), ids)
                positions = epoch * order.total + np.arange(min(order.total, 50))
                assert [order.sample_id(p) for p in positions] == ids[:len(positions)].tolist()
    order = BlockShuffledOrder([64] * 12, 5, 3)
    e0, e1 = _block_epoch(order, 0), _block_epoch(order, 1)
    assert not np.array_equal(e0, e1) and not np.array_equal(e0, _block_epoch(BlockShuffledOrder([64] * 12, 6, 3), 0))
    assert not np.array_equal(e0, _block_epoch(BlockShuffledOrder([64] * 12, 5, 4), 0))  # K is part of the order


def test_blocks_order_reads_k_shards_at_a_time_each_once_per_epoch_and_mixes_within():
    """Each block of the epoch is K whole shards of a seeded shard permutation, read in turn: at any
    point of an epoch at most K shards have been started and not finished (the shards a node must
    hold), and every shard is read whole within one block; within a block the samples are shuffled
    (not shard after shard), and the shard permutation changes with the epoch. Shards of unequal
    sizes, as prep writes them (each task's last shard is short)."""
    counts, k = [40 + (i * 7) % 23 for i in range(24)], 4
    order = BlockShuffledOrder(counts, 11, k)
    firsts = []
    for epoch in range(3):
        shard = np.searchsorted(order.cum, _block_epoch(order, epoch), side="right") - 1
        first = {int(s): int(np.flatnonzero(shard == s)[0]) for s in range(24)}
        last = {int(s): int(np.flatnonzero(shard == s)[-1]) for s in range(24)}
        in_progress = [sum(first[s] <= i <= last[s] for s in range(24)) for i in range(len(shard))]
        assert max(in_progress) == k, max(in_progress)
        starts = sorted(first.values())
        block_starts = starts[::k]  # each block begins where its K shards all begin together
        for b, lo in enumerate(block_starts):
            hi = block_starts[b + 1] if b + 1 < len(block_starts) else len(shard)
            members = set(shard[lo:hi].tolist())
            assert len(members) == min(k, 24 - b * k) and all(first[m] >= lo and last[m] < hi for m in members)
            runs = int(np.count_nonzero(np.diff(shard[lo:hi]))) + 1
            assert runs > (hi - lo) // 3, runs  # shuffled within: a shard's samples spread over the block
        firsts.append(sorted(set(shard[:block_starts[1]].tolist())))
    assert len({tuple(f) for f in firsts}) == 3  # each epoch permutes the shards anew


def test_blocks_order_memory_is_per_shard_not_per_sample():
    """SlimPajama's train split (~300M samples in 75k shards): a lookup far into training builds the
    epoch's shard permutation once (two int64 per shard) and nothing per sample."""
    order = BlockShuffledOrder([4096] * 75_000, seed=1234, block_shards=16)
    tracemalloc.start()
    ids = order.sample_ids(np.arange(10**9, 10**9 + 4096))
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    print(f"blocks order at 75k shards: traced peak {peak / 2**20:.2f} MiB for the first lookup of an epoch")
    assert len(np.unique(ids)) == 4096 and peak < 2 * 75_000 * 8 + 4 * 2**20
    shard = np.searchsorted(order.cum, ids, side="right") - 1
    assert len(np.unique(shard)) <= 2 * 16  # a global batch reads within one block (or two, at its edge)


def test_blocks_order_is_validated():
    with pytest.raises(ValueError, match="data.order='shuffle'"):
        DataConfig(order="shuffle")
    with pytest.raises(ValueError, match="data.block_shards=0"):
        DataConfig(order="blocks", block_shards=0)
