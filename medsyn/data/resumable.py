"""A shuffling sampler whose order depends only on (seed, epoch) and that can resume mid-epoch.

Lightning restarts a mid-epoch run with a fresh data iterator; this sampler skips the samples the
interrupted run already consumed, so a resumed run sees exactly the batches an uninterrupted run
would. What was consumed is asked (`consumed`) when an epoch's iteration starts, not when the sampler
is made: only then has Lightning settled which epoch it continues (a run stopped at an epoch's last
batch continues with the next epoch, from its start). It also splits the order across distributed
ranks (the trainer runs with `use_distributed_sampler=False`) and yields `(index, draw)` keys: `draw`
is unique per epoch and position, so random augmentations (e.g. SR crops) can be seeded by it and are
reproducible too.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
from torch.utils.data import Sampler


class ResumableSampler(Sampler[tuple[int, int]]):
    """Per-epoch permutation from (seed, epoch); rank `rank` of `world_size` takes every world_size-th item.

    consumed: called when an iteration starts; returns how many of this rank's samples of the epoch
    being started were already trained on (a resumed run), which are skipped.
    """

    def __init__(
        self,
        num_samples: int,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        shuffle: bool = True,
        batch_size: int = 1,
        drop_last: bool = True,
        consumed: Callable[[], int] | None = None,
    ) -> None:
        if num_samples < 1:
            raise ValueError("ResumableSampler needs at least one sample")
        self.num_samples, self.seed, self.shuffle = num_samples, seed, shuffle
        self.rank, self.world_size = rank, world_size
        self.batch_size, self.drop_last = batch_size, drop_last
        self.epoch = 0
        self.consumed = consumed
        self._skip = 0

    def set_epoch(self, epoch: int) -> None:
        """Called by Lightning at the start of every epoch."""
        self.epoch = epoch

    def skip(self, samples: int) -> None:
        """Skip the first `samples` of this rank's share in the next iteration only (mid-epoch resume)."""
        self._skip = max(0, int(samples))

    def _per_rank(self) -> int:
        per_rank = -(-self.num_samples // self.world_size)  # pad so every rank gets the same count
        if self.drop_last:
            per_rank = per_rank // self.batch_size * self.batch_size or per_rank
        return per_rank

    def __len__(self) -> int:
        return self._per_rank()

    def __iter__(self) -> Iterator[tuple[int, int]]:
        if self.shuffle:
            gen = torch.Generator().manual_seed(int(self.seed) * 1_000_003 + self.epoch)
            order = torch.randperm(self.num_samples, generator=gen).tolist()
        else:
            order = list(range(self.num_samples))
        per_rank = self._per_rank()
        total = per_rank * self.world_size
        order = (order * (total // len(order) + 1))[:total]  # pad by wrapping around
        mine = order[self.rank : total : self.world_size]
        start, self._skip = max(self._skip, int(self.consumed()) if self.consumed is not None else 0), 0
        base = self.epoch * total
        for position in range(start, len(mine)):
            yield mine[position], base + position * self.world_size + self.rank
