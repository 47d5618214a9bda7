"""Data-parallel training on ``torch.distributed`` (gloo on CPU, nccl on GPU), started by ``torchrun``.

Every rank holds the whole (in-memory) dataset and derives the same global sample order, so no sampler state has to
be communicated: rank r takes micro-batches r, r+W, r+2W, ... of each global batch. Gradients are summed across ranks
once per optimizer step, after the last micro-batch, in one flattened all-reduce: adapter gradients are small, and
summing (not averaging) is what the step-level token normaliser expects.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as td


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def main(self) -> bool:
        return self.rank == 0


def init() -> Dist:
    """Read torchrun's environment; start the process group when there is more than one process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available()
    device = torch.device(f"cuda:{local}") if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    if world > 1 and not td.is_initialized():
        td.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(minutes=30))
    rank = td.get_rank() if td.is_initialized() else 0
    return Dist(rank=rank, world=world, local_rank=local, device=device)


def all_reduce_sum_(t: torch.Tensor, d: Dist) -> torch.Tensor:
    if d.world > 1:
        td.all_reduce(t, op=td.ReduceOp.SUM)
    return t


def all_reduce_grads_(params: list[torch.nn.Parameter], d: Dist) -> None:
    """Sum every trainable gradient across ranks in one flat buffer (missing grads count as zero)."""
    if d.world == 1:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1).float() for g in grads])
    td.all_reduce(flat, op=td.ReduceOp.SUM)
    offset = 0
    for p, g in zip(params, grads):
        n = g.numel()
        p.grad = flat[offset:offset + n].view_as(g).to(g.dtype)
        offset += n


def union_keys(keys, d: Dist) -> list[str]:
    """The sorted union of every rank's metric names (a rank may have had nothing to report this step)."""
    if d.world == 1:
        return sorted(keys)
    gathered: list = [None] * d.world
    td.all_gather_object(gathered, sorted(keys))
    return sorted(set().union(*gathered))


def barrier(d: Dist) -> None:
    if d.world > 1:
        td.barrier()


def all_gather_object(obj, d: Dist) -> list:
    """Every rank's ``obj``, in rank order, on every rank (small picklable objects: RNG states, metric names)."""
    if d.world == 1:
        return [obj]
    gathered: list = [None] * d.world
    td.all_gather_object(gathered, obj)
    return gathered


def broadcast_object(obj, d: Dist):
    if d.world == 1:
        return obj
    box = [obj]
    td.broadcast_object_list(box, src=0)
    return box[0]


def shutdown(d: Dist) -> None:
    if d.world > 1 and td.is_initialized():
        td.destroy_process_group()
