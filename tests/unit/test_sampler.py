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


def test_group_by_length_is_a_seeded_permutation_with_less_padding():
    import random

    from tuneforge.train.sampler import WINDOW, row_length

    rng = random.Random(0)
    lengths = [rng.choice([3, 5, 8, 40, 60]) + rng.randint(0, 2) for _ in range(1000)]
    plain, grouped = GlobalOrder(1000, 8, seed=1), GlobalOrder(1000, 8, seed=1, lengths=lengths)
    for epoch in range(2):
        rows = _epoch(grouped, epoch)
        assert sorted(rows) == list(range(1000))  # every row once per epoch
        assert rows == _epoch(GlobalOrder(1000, 8, seed=1, lengths=lengths), epoch)  # a pure function: resumable
    def padded(order):  # cells a batch pads to its longest row
        rows = _epoch(order, 0)
        return sum(max(lengths[r] for r in rows[i: i + 8]) * len(rows[i: i + 8]) for i in range(0, 1000, 8))
    assert padded(grouped) < 0.5 * padded(plain)
    first = _epoch(grouped, 0)[:8]
    assert max(lengths) in [lengths[r] for r in first]  # the longest row's batch comes first
    # each window of WINDOW batches holds the rows of the plain shuffle's window, reordered
    span = WINDOW * 8
    cut = lambda rows: sorted(sorted(rows[i: i + span]) for i in range(0, 1000, span))  # noqa: E731
    assert cut(_epoch(grouped, 0)) == cut(_epoch(plain, 0))
    assert row_length({"input_ids": [1, 2, 3], "rejected_input_ids": [1] * 7, "labels": [0] * 9}) == 7
    assert row_length({"ranking_input_ids": [[1, 2], [1, 2, 3, 4]]}) == 4


def test_group_by_length_trains_and_resumes_bitwise(tmp_path, pc_file):
    import torch
    from conftest import base_config

    from tuneforge import api
    from tuneforge.config import RunConfig
    from tuneforge.safeio import load_safetensors

    cfg = lambda d, **kw: RunConfig.model_validate(base_config(d, pc_file, group_by_length=True, max_steps=6,  # noqa: E731
                                                               **kw))
    full = api.train(cfg(tmp_path / "a"))
    cut = cfg(tmp_path / "b", save_every=3, keep_last=5)
    api.train(cut)
    resumed = api.train(cut, resume=str(tmp_path / "b" / "run" / "checkpoints" / "step-00000003"))
    a, b = (load_safetensors(o.saved / "adapter_model.safetensors") for o in (full, resumed))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
