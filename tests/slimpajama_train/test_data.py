"""The global sample order: a function of (manifest, seed, epoch), not of ranks or workers."""
import pytest
import torch

from slimpajama_train.data import DataConfig, GlobalSampleOrder, RankBatchSampler, open_dataset, train_loader, val_loader


def test_each_epoch_is_a_permutation_and_epochs_differ():
    order = GlobalSampleOrder([5, 7, 3], seed=1)
    e0 = [order.sample_id(p) for p in range(15)]
    e1 = [order.sample_id(p) for p in range(15, 30)]
    assert sorted(e0) == sorted(e1) == list(range(15)) and e0 != e1
    assert order.locate(0) == (0, 0) and order.locate(5) == (1, 0) and order.locate(14) == (2, 2)
    assert [GlobalSampleOrder([5, 7, 3], seed=1).sample_id(p) for p in range(15)] == e0


def _sequence(world: int, start: int, steps: int, G: int = 12, B: int = 2) -> list[list[int]]:
    """Positions of each global step, assembled from every rank's micro-batches."""
    per_rank = [iter(RankBatchSampler(start, G, B, r, world)) for r in range(world)]
    out = []
    for _ in range(steps):
        step = []
        for it in per_rank:
            for _ in range(G // world // B):
                step += next(it)
        out.append(step)
    return out


@pytest.mark.parametrize("world", [1, 2, 3, 6])
def test_global_batches_do_not_depend_on_world_size(world):
    assert _sequence(world, 0, 5) == _sequence(1, 0, 5)


def test_resume_is_a_seek():
    assert _sequence(2, 36, 2) == _sequence(2, 0, 5)[3:]
    with pytest.raises(ValueError, match="global batch boundary"):
        RankBatchSampler(5, 12, 2, 0, 2)
    with pytest.raises(ValueError, match="not divisible"):
        RankBatchSampler(0, 12, 5, 0, 2)


def test_loader_reads_the_ordered_samples(demo_shards):
    cfg = DataConfig(path=str(demo_shards), micro_batch_size=4, num_workers=0)
    manifest, data_dir = open_dataset(cfg)
    loader = iter(train_loader(cfg, manifest, data_dir, start=0, global_batch=8, rank=0, world_size=1))
    x, y = next(loader)
    assert x.shape == y.shape == (4, 64) and x.dtype == torch.long
    assert torch.equal(x[:, 1:], y[:, :-1])
    # rank 1 of 2 reads exactly the second half of the same global batch
    r1 = iter(train_loader(cfg, manifest, data_dir, start=0, global_batch=8, rank=1, world_size=2))
    full = torch.cat([x, next(loader)[0]])
    assert torch.equal(next(r1)[0], full[4:8])
    v = list(val_loader(cfg, manifest, data_dir, batches=2, global_batch=8, rank=0, world_size=1))
    assert len(v) == 4 and torch.equal(v[0][0], list(val_loader(cfg, manifest, data_dir, 2, 8, 0, 1))[0][0])
    # the same samples on 2 ranks: rank 1 holds the second half of each global batch
    v1 = list(val_loader(cfg, manifest, data_dir, batches=2, global_batch=8, rank=1, world_size=2))
    assert len(v1) == 2 and torch.equal(v1[0][0], v[1][0]) and torch.equal(v1[1][0], v[3][0])
