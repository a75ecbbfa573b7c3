"""ResumableSampler: an order fixed by (seed, epoch), split across ranks, resumable mid-epoch."""

from __future__ import annotations

from collections import Counter

import pytest

from medsyn.data.resumable import ResumableSampler


def drawn(sampler: ResumableSampler, epoch: int = 0) -> list[tuple[int, int]]:
    """One epoch of `(index, draw)` keys."""
    sampler.set_epoch(epoch)
    return list(sampler)


def test_order_depends_only_on_seed_and_epoch():
    a, b = drawn(ResumableSampler(20, seed=3), 1), drawn(ResumableSampler(20, seed=3), 1)
    assert a == b and sorted(i for i, _ in a) == list(range(20))  # a permutation
    assert [i for i, _ in a] != [i for i, _ in drawn(ResumableSampler(20, seed=3), 2)]
    assert [i for i, _ in a] != [i for i, _ in drawn(ResumableSampler(20, seed=4), 1)]
    assert [i for i, _ in drawn(ResumableSampler(5, shuffle=False))] == [0, 1, 2, 3, 4]


@pytest.mark.parametrize(("num_samples", "world_size"), [(12, 3), (10, 4)])
def test_ranks_partition_the_padded_order(num_samples, world_size):
    full = [i for i, _ in drawn(ResumableSampler(num_samples, seed=1, drop_last=False))]
    shares = [
        drawn(ResumableSampler(num_samples, 1, r, world_size, drop_last=False)) for r in range(world_size)
    ]
    per_rank = -(-num_samples // world_size)
    assert [len(s) for s in shares] == [per_rank] * world_size  # equal counts: no rank waits at a barrier
    interleaved = [shares[r][p][0] for p in range(per_rank) for r in range(world_size)]
    padded = (full * 2)[: per_rank * world_size]  # wrapped around to fill the last round
    assert interleaved == padded
    assert Counter(interleaved) == Counter(range(num_samples)) + Counter(full[: len(padded) - num_samples])


def test_drop_last_keeps_whole_batches():
    sampler = ResumableSampler(10, batch_size=4)
    assert len(sampler) == 8 and len(drawn(sampler)) == 8
    assert len(ResumableSampler(3, batch_size=4)) == 3  # fewer than a batch: keep them all


def test_skip_yields_the_tail_once():
    sampler = ResumableSampler(10, seed=2, rank=1, world_size=2)
    full = drawn(sampler, 3)
    sampler.skip(3)
    assert drawn(sampler, 3) == full[3:]  # the same indices and the same draw ids
    assert drawn(sampler, 3) == full  # the skip applied to one iteration only
    sampler.skip(-5)
    assert drawn(sampler, 3) == full


def test_draw_ids_are_unique_within_and_across_epochs():
    ids = []
    for epoch in range(3):
        for rank in range(2):
            ids += [draw for _, draw in drawn(ResumableSampler(7, rank=rank, world_size=2), epoch)]
    assert len(ids) == 3 * 8 and len(set(ids)) == len(ids)


def test_needs_a_sample():
    with pytest.raises(ValueError, match="at least one sample"):
        ResumableSampler(0)


def test_consumed_is_asked_when_the_iteration_starts():
    # Lightning settles which epoch a resumed run continues (and how far) only after it made the
    # iterator: the sampler must ask then, not when it was built
    done = {"samples": 6}
    sampler = ResumableSampler(10, seed=2, consumed=lambda: done["samples"])
    sampler.set_epoch(0)
    it = iter(sampler)
    sampler.set_epoch(1)  # a run stopped at epoch 0's last batch continues with epoch 1 ...
    done["samples"] = 0  # ... from its start
    assert list(it) == drawn(ResumableSampler(10, seed=2), 1)
    done["samples"] = 4  # stopped mid-epoch: the rest of the epoch
    assert drawn(sampler, 1) == drawn(ResumableSampler(10, seed=2), 1)[4:]
