"""The global sample order: seeded epochs, exact coverage, rank split (DT-3), resume by position."""

import pytest

from tuneforge.train.optim import lr_factor
from tuneforge.train.sampler import GlobalOrder, Position, micro_batches


def _epoch(order, epoch):
    pos, rows = Position(epoch, 0), []
    for _ in range(order.steps_per_epoch):
        r, pos = order.next(pos)
        rows += r
    return rows


@pytest.mark.parametrize("n,batch", [(10, 4), (9, 3), (7, 8), (101, 16)])
def test_each_epoch_covers_every_row_once(n, batch):
    order = GlobalOrder(n, batch, seed=3)
    for epoch in range(3):
        assert sorted(_epoch(order, epoch)) == list(range(n))
    assert _epoch(order, 0) != _epoch(order, 1) or n < 3


@pytest.mark.parametrize("world,micro", [(2, 4), (3, 2), (2, 3)])
def test_ranks_split_each_step_without_overlap(world, micro):
    """DT-3 for sizes not divisible by the world size: the union of ranks is the step, no duplicates."""
    order = GlobalOrder(37, micro * world * 2, seed=0)
    pos = Position()
    for _ in range(order.steps_per_epoch * 2):
        rows, pos = order.next(pos)
        per_rank = [sum(micro_batches(rows, micro, r, world), []) for r in range(world)]
        flat = sum(per_rank, [])
        assert sorted(flat) == sorted(rows) and len(flat) == len(set(flat))


def test_order_depends_only_on_seed_and_epoch():
    a, b = GlobalOrder(50, 5, seed=1), GlobalOrder(50, 5, seed=1)
    assert a.permutation(2) == b.permutation(2)
    assert GlobalOrder(50, 5, seed=2).permutation(0) != a.permutation(0)


def test_lr_schedule_golden_values():
    assert lr_factor(0, 100, 10, "cosine") == pytest.approx(0.1)
    assert lr_factor(9, 100, 10, "cosine") == pytest.approx(1.0)
    assert lr_factor(10, 100, 10, "cosine") == pytest.approx(1.0)
    assert lr_factor(55, 100, 10, "cosine") == pytest.approx(0.5)
    assert lr_factor(100, 100, 10, "cosine") == pytest.approx(0.0)
    assert lr_factor(55, 100, 10, "linear") == pytest.approx(0.5)
    assert lr_factor(100, 100, 10, "cosine", min_ratio=0.1) == pytest.approx(0.1)
    assert lr_factor(70, 100, 0, "constant") == 1.0
