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

from torch import Tensor

from lowrank_train.config import knob
from lowrank_train.projectors.base import PROJECTORS, LowRankAdam, State, SVDOptions
from lowrank_train.projectors.subspace import svd_basis
from lowrank_train.seeding import generator


class SVDProjector(LowRankAdam):
    """A LowRankAdam whose basis is the gradient's top-r singular vectors (GaLore, Fira, Q-GaLore)."""

    def new_basis(self, grad: Tensor, state: State) -> Tensor:
        gen = generator(self.seed, state["name"], "refresh", state["refreshes"])
        previous = self.previous_basis(state)
        return svd_basis(grad, state["side"], self.options.rank, self.options.svd, previous, gen)

    def previous_basis(self, state: State) -> Tensor | None:
        """The warm start of the fast finder (None before the first refresh)."""
        return state.get("basis")


@PROJECTORS.register
class GaLore(SVDProjector):
    name = "galore"

    def add_up_(self, param, low_update, low_grad, grad, state, alpha) -> None:
        """W += alpha * scale * back(N) as one GEMM accumulating into W (addmm_): no full-size
        direction is formed, scaled or read again (the step's largest memory traffic)."""
        basis = state["basis"]
        low = low_update.to(basis.dtype)
        a = alpha * self.options.scale
        if state["side"] == "right":
            param.addmm_(low, basis.T, alpha=a)
        else:
            param.addmm_(basis, low, alpha=a)

    @dataclass
    class Config(SVDOptions):
        # the official C4 scripts: r 128 (60M) to 1024 (1B, 7B), T 200 (7B 500), alpha 0.25
        rank: int = knob(128, "rank r of the projected gradient")
        update_gap: int = knob(200, "T: steps between SVD refreshes")
        scale: float = knob(0.25, "alpha: W <- W - lr * alpha * N B^T")
