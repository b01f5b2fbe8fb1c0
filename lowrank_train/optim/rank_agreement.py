"""Under DDP every rank holds rank 0's projector state after a refresh (issue 15: "every rank
holds the same basis").

Each rank runs the finder on the same all-reduced gradient, then takes rank 0's result: the
`shared_keys` of each refreshed tensor are broadcast from rank 0. A finder can still fail on
some ranks only (a batched call sized by each rank's own headroom rounds differently, and one
rank's CholeskyQR or eigh may fail where another's does not). Rank 0's outcome then decides,
and every rank makes the same collective calls, so a failure on one rank cannot hang the
others. A tensor whose outcome differs takes rank 0's whole state: its basis, its moments
(`moments_at_refresh: rotate` carried them on one side only) and its counters.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from lowrank_train.distributed import world_size


def agree_on_refresh(
    states: list[dict], failed: set[int], keys: tuple[str, ...], device: torch.device
) -> None:
    """Make every rank's `states` (the tensors one refresh tried, in the same order on every
    rank) equal to rank 0's, given the positions that failed on this rank (see the module).
    One broadcast and one all-reduce of a flag per tensor, then the keys of each refreshed
    tensor; a no-op on one process."""
    if world_size() == 1 or not states:
        return
    mine = torch.tensor([i in failed for i in range(len(states))], dtype=torch.uint8, device=device)
    rank0 = mine.clone()
    dist.broadcast(rank0, src=0)
    differs = (mine != rank0).to(torch.uint8)
    dist.all_reduce(differs, op=dist.ReduceOp.MAX)  # every rank learns where any rank differed
    for state, failed_on_0, split in zip(states, rank0.tolist(), differs.tolist(), strict=True):
        if split:
            take_whole_state(state, device)
        elif not failed_on_0:
            for key in keys:
                dist.broadcast(state[key], src=0)


def take_whole_state(state: dict, device: torch.device) -> None:
    """Replace this rank's `state` with rank 0's: its plain values and the tensors' shapes and
    dtypes as one object broadcast, then each tensor (keys rank 0 lacks are dropped)."""
    tensors = {k: (tuple(v.shape), v.dtype) for k, v in state.items() if torch.is_tensor(v)}
    plain = {k: v for k, v in state.items() if not torch.is_tensor(v)}
    spec = [(tensors, plain)]
    dist.broadcast_object_list(spec, src=0, device=device if device.type == "cuda" else None)
    tensors, plain = spec[0]
    for key in set(state) - set(tensors) - set(plain):
        del state[key]
    state.update(plain)
    for key, (shape, dtype) in tensors.items():  # rank 0's order, so the same on every rank
        held = state.get(key)
        if not (torch.is_tensor(held) and tuple(held.shape) == shape and held.dtype == dtype):
            state[key] = torch.empty(shape, dtype=dtype, device=device)
        dist.broadcast(state[key], src=0)
