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
from lowrank_train.projectors.base import PROJECTORS, LowRankAdam, State, SVDOptions
from lowrank_train.projectors.subspace import svd_basis
from lowrank_train.seeding import generator

BATCH_BYTES = 2**28  # fp32 input of one batched finder call (256 MiB; temporaries ~3x that)


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

    def refresh_many(self, items: list[tuple[Tensor, State]]) -> None:
        """All tensors of one shape (and warm or cold) in batched finder calls, in chunks of at
        most BATCH_BYTES of fp32 input: a QR, eigh or SVD of a small matrix is latency-bound on
        a GPU, so b of them cost little more than one. Each matrix gets what it would get alone."""
        if type(self).new_basis is not SVDProjector.new_basis:  # another finder: one at a time
            return super().refresh_many(items)
        groups: dict[tuple, list[tuple[Tensor, State]]] = {}
        for grad, state in items:
            key = (tuple(grad.shape), grad.dtype, state["side"], self.previous_basis(state) is None)
            groups.setdefault(key, []).append((grad, state))
        found = []
        for (shape, _, side, cold), group in groups.items():
            chunk = max(1, BATCH_BYTES // (4 * shape[0] * shape[1]))
            for start in range(0, len(group), chunk):
                part = group[start : start + chunk]
                previous = None if cold else torch.stack([self.previous_basis(s) for _, s in part])
                gens = [generator(self.seed, s["name"], "refresh", s["refreshes"]) for _, s in part]
                grads = torch.stack([g for g, _ in part])
                bases = svd_basis(
                    grads,
                    side,
                    self.options.rank,
                    self.options.svd,
                    previous,
                    gens,
                    self.finder_fallbacks,
                )
                kept = [self.held(b, grads.dtype) for b in bases.unbind(0)]
                found += list(zip(part, kept, strict=True))
                del grads, bases, previous  # freed before the next chunk's are made
        if not torch.isfinite(torch.stack([b.abs().sum() for _, b in found])).all():
            raise FloatingPointError("the basis finder returned non-finite values")
        for (grad, state), basis in found:  # nothing installed before every basis is known
            self.install(basis, state, grad.dtype)

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
