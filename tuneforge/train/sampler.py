"""The global sample order: a pure function of (seed, epoch), so resume needs only a position.

Each epoch is a seeded permutation of all rows; each optimizer step takes the next ``global_batch`` rows of it (the
last step of an epoch may be smaller: no row is skipped, none repeated). Every rank computes the same order and
takes its own micro-batches, so the order does not depend on the number of processes. ``group_by_length`` regroups
each epoch's permutation (still a pure function of seed and epoch) into batches of similar length.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Position:
    epoch: int = 0
    offset: int = 0  # rows of this epoch's permutation already consumed


WINDOW = 50  # group_by_length sorts windows of this many global batches (the window HF's Trainer uses)


def row_length(row: dict) -> int:
    """A training row's padded width: its longest token sequence (a preference row's chosen or rejected side, the
    longest response of a ranking)."""
    n = 0
    for key, v in row.items():
        if not key.endswith("input_ids"):
            continue
        if hasattr(v, "dim"):
            n = max(n, int(v.shape[-1]))
        elif v and not isinstance(v[0], int):  # a list of sequences (a ranking's responses)
            n = max(n, max(len(x) for x in v))
        else:
            n = max(n, len(v))
    return n


def group_by_length(order: list[int], lengths: list[int], batch: int) -> list[int]:
    """Regroup a shuffled order so each batch holds rows of similar length, and padding (compute spent on nothing)
    shrinks: windows of ``WINDOW`` batches of the shuffled order are each sorted longest first, so the batches stay
    random across windows and the rows within a batch come from one random window. The window holding the longest
    row goes first: a batch that runs out of memory does so at step 1, not hours in."""
    span = WINDOW * batch
    windows = [sorted(order[i: i + span], key=lambda r: -lengths[r]) for i in range(0, len(order), span)]
    longest = max(range(len(windows)), key=lambda w: lengths[windows[w][0]])
    windows.insert(0, windows.pop(longest))
    return [r for w in windows for r in w]


class GlobalOrder:
    def __init__(self, n_rows: int, global_batch: int, seed: int, shuffle: bool = True,
                 lengths: list[int] | None = None):
        """``lengths``: each row's width, to batch rows of similar length together (``group_by_length``)."""
        if n_rows <= 0:
            raise ValueError("no training rows")
        if lengths is not None and len(lengths) != n_rows:
            raise ValueError(f"{len(lengths)} row lengths for {n_rows} rows")
        self.n, self.batch, self.seed, self.shuffle, self.lengths = n_rows, global_batch, seed, shuffle, lengths
        self._cache: tuple[int, list[int]] | None = None

    def permutation(self, epoch: int) -> list[int]:
        if self._cache is None or self._cache[0] != epoch:
            if self.shuffle:
                g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
                order = torch.randperm(self.n, generator=g).tolist()
            else:
                order = list(range(self.n))
            if self.lengths is not None:
                order = group_by_length(order, self.lengths, self.batch)
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
