"""The global sample order: a pure function of (seed, epoch), so resume needs only a position.

Each epoch is a seeded permutation of all rows; each optimizer step takes the next ``global_batch`` rows of it (the
last step of an epoch may be smaller: no row is skipped, none repeated). Every rank computes the same order and
takes its own micro-batches, so the order does not depend on the number of processes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Position:
    epoch: int = 0
    offset: int = 0  # rows of this epoch's permutation already consumed


class GlobalOrder:
    def __init__(self, n_rows: int, global_batch: int, seed: int, shuffle: bool = True):
        if n_rows <= 0:
            raise ValueError("no training rows")
        self.n, self.batch, self.seed, self.shuffle = n_rows, global_batch, seed, shuffle
        self._cache: tuple[int, list[int]] | None = None

    def permutation(self, epoch: int) -> list[int]:
        if self._cache is None or self._cache[0] != epoch:
            if self.shuffle:
                g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
                order = torch.randperm(self.n, generator=g).tolist()
            else:
                order = list(range(self.n))
            self._cache = (epoch, order)
        return self._cache[1]

    @property
    def steps_per_epoch(self) -> int:
        return -(-self.n // self.batch)

    def next(self, pos: Position) -> tuple[list[int], Position]:
        """Rows of the next step and the position after it."""
        if pos.offset >= self.n:
            pos = Position(pos.epoch + 1, 0)
        rows = self.permutation(pos.epoch)[pos.offset: pos.offset + self.batch]
        return rows, Position(pos.epoch, pos.offset + len(rows))


def micro_batches(rows: list[int], micro: int, rank: int, world: int) -> list[list[int]]:
    """This rank's micro-batches of one global step: chunks r, r+W, r+2W, ... of size ``micro``."""
    chunks = [rows[i: i + micro] for i in range(0, len(rows), micro)]
    return [c for c in chunks[rank::world] if c]
