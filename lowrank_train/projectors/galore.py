"""GaLore (Zhao et al. 2024, arXiv 2403.03507), as its official code does it.

Right side when m >= n (B = Q, n x r), left otherwise (B = P, m x r); per step t:
    if (t-1) mod T == 0: B = top-r singular vectors of G on the smaller side
    R = down(G);  Adam moments on R;  N = M / (sqrt(V) + eps)
    W <- W - lr * c_t * alpha * back(N);  then W <- W - lr * wd * W
Moments are kept across a refresh (the code's choice; `moments_at_refresh` offers reset and
rotate). `svd: exact` is the code's full SVD; `fast` a randomized range finder for the first
refresh and warm-started subspace iteration after it (projectors/subspace.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from lowrank_train.config import knob
from lowrank_train.projectors.base import (
    FINDER_ERRORS,
    PROJECTORS,
    LowRankAdam,
    State,
    SVDOptions,
)
from lowrank_train.projectors.subspace import finder_call_bytes, svd_basis
from lowrank_train.seeding import generator

# The most one batched finder call may allocate (`SVDProjector.refresh_call_bytes`, 1
# GiB): a QR, eigh or SVD of a small matrix is latency-bound on a GPU, so b of them cost little
# more than one, and at 1B's shapes ~20 matrices a call already fill the GPU.
REFRESH_WORKSPACE_BYTES = 2**30


def refresh_budget(device: torch.device) -> int:
    """The bytes one batched finder call may allocate: REFRESH_WORKSPACE_BYTES, and on CUDA at
    most the headroom under the run's allocation peak so far (max_memory_allocated -
    memory_allocated: what the backward pass freed), so a refresh never raises a run's peak
    unless one matrix alone exceeds it. Elsewhere the cap alone: a chunking that depends on the
    shapes only."""
    if device.type != "cuda":
        return REFRESH_WORKSPACE_BYTES
    headroom = torch.cuda.max_memory_allocated(device) - torch.cuda.memory_allocated(device)
    return max(0, min(REFRESH_WORKSPACE_BYTES, headroom))


class SVDProjector(LowRankAdam):
    """A LowRankAdam whose basis is the gradient's top-r singular vectors (GaLore, Fira, Q-GaLore)."""

    def add_up_many_(self, params, low_update, low_grad, grads, states, alpha) -> None:
        """W_i += alpha * scale * back(N_i) as one GEMM accumulating into W_i: no full-size
        direction is formed, scaled or read again (the step's largest memory traffic)."""
        for param, n, state in zip(params, low_update.unbind(0), states, strict=True):
            self.add_back(param, n, state, alpha * self.options.scale, inplace=True)

    def new_basis(self, grad: Tensor, state: State) -> Tensor:
        gen = generator(self.seed, state["name"], "refresh", state["refreshes"])
        previous = self.previous_basis(state)
        o = self.options
        return svd_basis(grad, state["side"], o.rank, o.svd, previous, gen, self.finder_fallbacks)

    def refresh_call_bytes(
        self, shape: tuple[int, int], dtype: torch.dtype, warm: bool, matrices: int
    ) -> int:
        """A batched refresh call's allocations: the finder's (`finder_call_bytes`) and the
        new bases held until the call's are installed."""
        o = self.options
        finder = finder_call_bytes(shape, o.rank, o.svd, warm, dtype, matrices)
        return finder + matrices * self.held_basis_bytes(shape, dtype)

    def refresh_chunk(
        self, shape: tuple[int, int], dtype: torch.dtype, warm: bool, count: int, budget: int
    ) -> int:
        """How many of `count` same-shape matrices one finder call takes within `budget` bytes
        (at least one): the call's bytes are a fixed part plus a part per matrix."""
        fixed = self.refresh_call_bytes(shape, dtype, warm, 0)
        each = self.refresh_call_bytes(shape, dtype, warm, 1) - fixed
        return max(1, min(count, (budget - fixed) // each))

    def refresh_many(self, items: list[tuple[Tensor, State]]) -> dict[int, str]:
        """The tensors of one shape (and warm or cold) in batched finder calls of
        `refresh_chunk` matrices, sized by `refresh_budget` before each call; a call's bases are
        installed before the next call, so a refresh holds one call's. Each matrix gets what it
        would get alone. A call that raises or returns a non-finite basis is redone one matrix
        at a time, so only the failing matrices keep their old bases."""
        if type(self).new_basis is not SVDProjector.new_basis:  # another finder: one at a time
            return super().refresh_many(items)
        groups: dict[tuple, list[int]] = {}
        for i, (grad, state) in enumerate(items):
            key = (tuple(grad.shape), grad.dtype, state["side"], self.previous_basis(state) is None)
            groups.setdefault(key, []).append(i)
        failed: dict[int, str] = {}
        for (shape, dtype, side, cold), positions in groups.items():
            start = 0
            while start < len(positions):
                budget = refresh_budget(items[positions[start]][0].device)
                left = len(positions) - start
                part = positions[
                    start : start + self.refresh_chunk(shape, dtype, not cold, left, budget)
                ]
                start += len(part)
                bases = self._find_batched([items[i] for i in part], side, cold)
                if bases is None:  # redo this call's matrices one by one
                    alone = super().refresh_many([items[i] for i in part])
                    failed.update({part[j]: reason for j, reason in alone.items()})
                    continue
                for i, basis in zip(part, bases, strict=True):
                    self.install(basis, items[i][1], items[i][0].dtype)
                del bases  # installed: freed before the next call's are found
        return failed

    def _find_batched(self, part: list[tuple[Tensor, State]], side: str, cold: bool):
        """The held bases of one batched finder call, or None where it raised or any is not
        finite (one host sync)."""
        gens = [generator(self.seed, s["name"], "refresh", s["refreshes"]) for _, s in part]
        grads = torch.stack([g for g, _ in part])
        previous = None if cold else torch.stack([self.previous_basis(s) for _, s in part])
        o = self.options
        try:
            found = svd_basis(grads, side, o.rank, o.svd, previous, gens, self.finder_fallbacks)
        except FINDER_ERRORS:
            return None
        del grads, previous  # before the held copies are made
        if not bool(torch.isfinite(found.sum())):  # orthonormal columns cannot overflow it
            return None
        return [self.held(b, part[0][0].dtype) for b in found.unbind(0)]

    def previous_basis(self, state: State) -> Tensor | None:
        """The warm start of the fast finder (None before the first refresh)."""
        return state.get("basis")


@PROJECTORS.register
class GaLore(SVDProjector):
    """Adam on the gradient projected onto its top-r singular vectors, refreshed every T steps."""

    name = "galore"
    accumulates_projected = True  # its update reads G only through R = down(G)

    @dataclass
    class Config(SVDOptions):
        # the official C4 scripts: r 128 (60M) to 1024 (1B, 7B), T 200 (7B 500), alpha 0.25
        rank: int = knob(128, "rank r of the projected gradient")
        update_gap: int = knob(200, "T: steps between SVD refreshes")
        scale: float = knob(0.25, "alpha: W <- W - lr * alpha * N B^T")
