"""Distributed training on ``torch.distributed``: reductions and the layer assignment.

Kept apart from the preconditioner math (as Meta's distributed Shampoo keeps its
"distributor"): the optimizer calls these functions at fixed points of ``step``.

Strategies (``distributed_strategy``):

- ``"replicate"``: every rank keeps every factor. Before a factor update the captured
  statistics are combined across ranks: the input side (a mean over the layer's input
  rows) as the ranks' means weighted by their row counts, the output side as the
  total number of loss terms times the averaged gradients' squares (the mean of the
  ranks' statistics where their loss terms are equal; summed for
  ``loss_average=None``): see ``KroneckerOptimizer._sync_statistics``; gradients are
  averaged by
  ``DistributedDataParallel`` as usual; every rank then computes the same factors and
  natural gradients. N ranks with batch ``B/N`` end, step for step, where one process
  with batch ``B`` ends (to rounding), because the statistics are linear in the rows;
  so do ranks whose layers see different numbers of rows (an MoE expert's tokens).
- ``"shard"``: statistics are combined the same way, but each rank updates the factors
  and computes the natural gradients of only its assigned layers (balanced by a cost
  model); the natural gradients are summed across ranks (each entry has exactly one
  non-zero contribution, so the sum is exact) and every rank applies the same
  parameter step. After a factor update its owner broadcasts the new factors, so that
  every rank holds the current ``K``, ``C`` (SINGD's statistics ``P(K^T a^T a K)``
  depend on them) and every rank's ``state_dict()`` is complete.

Cost model for N ranks, per step, with ``P`` parameters, ``S`` the numbers held by
the statistics (the size of the structured ``H`` terms, about the size of the
factors) and ``F`` the preconditioner FLOPs of one process: replicate all-reduces
``S`` numbers every ``T`` steps and computes ``F`` on every rank; shard all-reduces
``S`` every ``T`` steps, broadcasts the updated factors (about ``2 S``: factors and
momenta) every ``T`` steps and all-reduces ``P`` numbers (the natural gradients)
every step, and computes about ``F / N`` per rank. An all-reduce of ``n`` numbers
moves about ``2 n (N - 1) / N`` numbers per rank (ring), a broadcast about ``n``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch import Tensor

STRATEGIES = ("replicate", "shard")

#: Bytes this process sent into collectives issued by torchsingd (for benchmarks).
traffic = {"all_reduce": 0, "broadcast": 0}


def world(group=None) -> tuple[int, int]:
    """``(rank, world size)``; ``(0, 1)`` when not running distributed."""
    if not (dist.is_available() and dist.is_initialized()):
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


def all_reduce_tensors(
    tensors: Sequence[Tensor], group=None, scales: Sequence[float] | None = None
) -> None:
    """Sum ``tensors`` across ranks in place, in one call; ``scales``: per tensor, a
    factor this rank's contribution is multiplied by first (a weighted sum: ``1 /
    world size`` everywhere averages).

    The tensors are packed into one float32 (float64 if any is float64) buffer, in
    which the factors are applied.
    """
    if not tensors:
        return
    work = torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32
    parts = [t.reshape(-1).to(work) for t in tensors]
    if scales is not None:
        parts = [p if s == 1.0 else p * s for p, s in zip(parts, scales, strict=True)]
    flat = torch.cat(parts)
    traffic["all_reduce"] += flat.nbytes
    dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group)
    offset = 0
    for t in tensors:
        t.copy_(flat[offset : offset + t.numel()].view_as(t))
        offset += t.numel()


def assign(costs: Sequence[float], ranks: int) -> list[int]:
    """Owner rank of each item: greedy longest-first onto the least-loaded rank."""
    load = [0.0] * ranks
    owner = [0] * len(costs)
    for i in sorted(range(len(costs)), key=lambda i: -costs[i]):
        r = min(range(ranks), key=lambda r: (load[r], r))
        owner[i] = r
        load[r] += costs[i]
    return owner


def broadcast_tensors(tensors: Sequence[Tensor], src: int, group=None) -> None:
    """Broadcast ``tensors`` from rank ``src`` of ``group`` in place, packed into one
    buffer (``dist.broadcast`` takes a global rank: translated here)."""
    if not tensors:
        return
    work = torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32
    flat = torch.cat([t.reshape(-1).to(work) for t in tensors])
    traffic["broadcast"] += flat.nbytes
    root = src if group is None else dist.get_global_rank(group, src)
    dist.broadcast(flat, src=root, group=group)
    offset = 0
    for t in tensors:
        t.copy_(flat[offset : offset + t.numel()].view_as(t))
        offset += t.numel()


def is_sharded_by_fsdp(params: Sequence[Tensor]) -> bool:
    """Whether parameters are DTensors (``torch.distributed.fsdp.fully_shard``)."""
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - very old torch
        return False
    return any(isinstance(p, DTensor) for p in params)
