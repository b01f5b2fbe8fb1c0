"""GradNormLoRP (Huang et al., arXiv 2412.19616), reconstructed from the weight-normalization
math, because no official implementation exists (research/projectors.md section 5).

What the sources give. The paper (through a summary; the PDF was not read for the digest)
weight-normalizes the matrix, w = g v / ||v||, and projects the update of the normalized
weight's gradient to low rank with SVD bases. Its repository does not implement that: the
scripts run GaLore's AdamW on a PEFT-DoRA wrapper of a frozen random network; `wadamw.py` never
writes its update back to the weight and omits the magnitude factor of the direction gradient;
`LowRankWeightNormAdamW.py` resets g to ||v|| every step and drops the tangent projection
(research 5.2). So this module is neither the repository's code nor verified against the paper.

What is built. Per output row i of W (out x in), at every step, with the current weight as the
direction and its row norms as the magnitude (so the model's parameter stays the dense W):
    v_i = W_i,  g_i = ||W_i||
    dL/dg_i = <G_i, v_i> / ||v_i||                                    (weight normalization)
    dL/dv_i = (g_i / ||v_i||) (G_i - (dL/dg_i) v_i / ||v_i||)         tangent: <dL/dv_i, v_i> = 0
    v' = v - lr c_t alpha back(N),  N = Adam on R = down(dL/dv)       GaLore (LowRankAdam)
    g' = g - lr c'_t N_g,  N_g = Adam on dL/dg                        its own Adam, m-vectors
    W <- g' v' / ||v'||  (row-wise);  then W <- W - lr wd W            GaLore's decay
GaLore's side and refresh: the basis is the top-r singular vectors of dL/dv (`refresh_input`),
refreshed every T steps; moments kept (`moments_at_refresh`). The magnitude's Adam has the
group's betas and eps, fp32 moments whatever `optim.state_dtype`, the bias correction c'_t of
the tensor's step, and no alpha. A zero row (a zero-initialized tensor) has no direction: it is
stepped as GaLore would step it, unnormalized, until it has one. `direction` is (W - W_new) / lr, so W - lr direction is the
new weight; the optimizer's step writes W_new directly (`update_`).

Reconstructed, not verified: the normalization axis (output rows here; the summary's matrix
form writes column norms of W_0 + IJ), that the projected quantity is the direction's gradient
(the summary's D_t is ambiguous), the one-sided projection (the summary writes a two-sided
U eta(U^T D V) V^T), the refresh rule (GaLore's), how g is optimized (Adam, as the repository's
LowRankWeightNormAdamW does), and the hyperparameters (GaLore's, which the repository's scripts
copy). Chosen because each is the weight-normalization math applied to GaLore's machinery with
no extra assumption, and the stated checks (research 5.4) hold for it.

State per tensor: LowRankAdam's (moments of dL/dv in state_dtype, the basis in the weight's
dtype) and `magnitude_exp_avg`, `magnitude_exp_avg_sq` (fp32, m each).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from lowrank_train.config import knob
from lowrank_train.projectors.base import PROJECTORS, State, SVDOptions, stacked_adam
from lowrank_train.projectors.galore import SVDProjector

NORM_FLOOR = 1e-12  # rows at or below this norm have no direction (see `split`)


def work_dtype(grad: Tensor) -> torch.dtype:
    """fp32 math for fp32/bf16 tensors; float64 stays float64 (the tests' references)."""
    return torch.float64 if grad.dtype == torch.float64 else torch.float32


def row_norms(v: Tensor, dtype: torch.dtype | None = None) -> Tensor:
    """||v_i|| of each output row, (m, 1) ((b, m, 1) for a stack), accumulated in `dtype` (no
    upcast copy of v)."""
    return torch.linalg.vector_norm(v, dim=-1, keepdim=True, dtype=dtype).clamp_min(NORM_FLOOR)


def magnitude_grad(grad: Tensor, v: Tensor, norms: Tensor | None = None) -> Tensor:
    """dL/dg_i = <G_i, v_i> / ||v_i||, (m, 1), accumulated in fp32 at least (`norms`: the
    rows' norms when the caller has them)."""
    dtype = work_dtype(grad)
    norms = row_norms(v, dtype) if norms is None else norms
    return (grad * v).sum(dim=-1, keepdim=True, dtype=dtype) / norms


def direction_grad(grad: Tensor, v: Tensor, g: Tensor) -> Tensor:
    """dL/dv_i = (g_i / ||v_i||) (G_i - (dL/dg_i) v_i / ||v_i||), (m, n)."""
    norms = row_norms(v, work_dtype(grad))
    return (g / norms) * torch.addcmul(grad, v, -magnitude_grad(grad, v, norms) / norms)


def split(grad: Tensor, v: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(g, dL/dg, dL/dv, zero rows) at g = ||v||, where g / ||v|| is 1: dL/dv = G - (dL/dg / g) v
    in one pass at the gradient's precision, the row sums in fp32. A zero row has no direction
    to normalize: dL/dg is 0 there, so it takes the plain gradient (and is not renormalized,
    so a zero-initialized tensor trains)."""
    g = row_norms(v, work_dtype(grad))
    grad_g = magnitude_grad(grad, v, g)
    grad_v = torch.addcmul(grad, v, (-grad_g / g).to(grad.dtype))
    return g, grad_g, grad_v, g <= NORM_FLOOR


@PROJECTORS.register
class GradNormLoRP(SVDProjector):
    """Reconstructed: GaLore's Adam on each weight row's direction, a small Adam on its norm."""

    reads_weight = True  # W = g v / ||v||: the step works on the normalised weight
    run_budget_scale = 4  # its runs stack full-size tensors (base.Projector)

    name = "gradnormlorp"

    @dataclass
    class Config(SVDOptions):
        # no official recipe of the method exists; the repository's scripts are GaLore's:
        # r 128 (60M) to 1024 (1B, 7B), T 200 (7B 500), alpha 0.25, lr 0.01 (7B 0.005)
        rank: int = knob(128, "rank r of the projected direction gradient")
        update_gap: int = knob(200, "T: steps between SVD refreshes")
        scale: float = knob(0.25, "alpha: v <- v - lr * alpha * N B^T (the direction's step)")

    def refresh_input(self, param: Tensor, grad: Tensor) -> Tensor:
        """The basis comes from the direction's gradient dL/dv, not from G."""
        return split(grad, param.to(grad.dtype))[2]

    def new_weights(
        self, params: Tensor, grads: Tensor, states: list[State], step: int, hp: dict
    ) -> Tensor:
        """g' v' / ||v'|| of a run's stacked weights and gradients (b, m, n), one Adam step of
        each direction (projected; `moments_step_many`) and magnitude (`stacked_adam`), in
        the basis's dtype: v' by one GEMM a tensor onto W, rescaled in place by an fp32 row
        factor (so the row norms are not rounded to the weight's precision). Everything but
        the GEMMs runs once on the stack; `step` is the run's (one, `runs`). `params`
        is consumed: v' is built in its storage (a stack is a copy)."""
        g, grad_g, grad_v, zero = split(grads, params.to(grads.dtype))
        directions = list(grad_v.to(params.dtype).unbind(0))
        low_update, _, correction = self.moments_step_many(directions, states, hp)
        del grad_v, directions  # the step reads only N from here on
        v_new = params.to(states[0]["basis"].dtype)  # in place where the dtypes agree
        for v, n, state in zip(v_new.unbind(0), low_update.unbind(0), states, strict=True):
            self.add_back(v, n, state, -hp["lr"] * correction * self.options.scale, inplace=True)
        for state in states:
            if "magnitude_exp_avg" not in state:
                state["magnitude_exp_avg"] = torch.zeros(g.shape[1], device=g.device)
                state["magnitude_exp_avg_sq"] = torch.zeros(g.shape[1], device=g.device)
        keys = ("magnitude_exp_avg", "magnitude_exp_avg_sq")
        step_g = stacked_adam(grad_g.flatten(1), states, keys, hp).to(g.dtype)
        beta1, beta2 = hp["betas"]
        correction_g = (1 - beta2**step) ** 0.5 / (1 - beta1**step)
        g_new = g - (hp["lr"] * correction_g) * step_g[..., None]
        factor = g_new / row_norms(v_new, g.dtype)
        return v_new.mul_(torch.where(zero, torch.ones_like(factor), factor))

    def new_weight(self, param: Tensor, grad: Tensor, state: State, step: int, hp: dict) -> Tensor:
        """`new_weights` of one tensor."""
        return self.new_weights(param[None].clone(), grad[None], [state], step, hp)[0]

    def direction(self, param: Tensor, grad: Tensor, state: State, step: int, hp: dict) -> Tensor:
        """(W - W_new) / lr: W - lr * direction is the new weight (zero at lr 0)."""
        w_new = self.new_weight(param, grad, state, step, hp)
        if hp["lr"] == 0:
            return torch.zeros_like(w_new)
        return (param.to(w_new.dtype) - w_new) / hp["lr"]

    def update_(self, param: Tensor, grad: Tensor, state: State, step: int, hp: dict) -> None:
        """W <- W_new exactly (no (W - W_new) / lr round trip), through `update_many_`."""
        self.update_many_([(param, grad, state, step)], hp)

    def update_many_(self, items: list[tuple[Tensor, Tensor, State, int]], hp: dict) -> None:
        """W_i <- W_new of a group's tensors, run by run (`runs`): the run's weights
        and gradients stacked (a copy of each), `new_weights` on the stack, one multi-tensor
        copy back; GaLore's decay after it."""
        for run in self.runs(items):
            params = [p for p, _, _, _ in run]
            grads = torch.stack([g for _, g, _, _ in run])
            states, step = [s for _, _, s, _ in run], run[0][3]
            w_new = self.new_weights(torch.stack(params), grads, states, step, hp)
            del grads
            self.decay_many_(params, hp, before_update=True)
            torch._foreach_copy_(params, list(w_new.unbind(0)))
            self.decay_many_(params, hp, before_update=False)

    def run_item_bytes(self, shape: tuple[int, int], dtype: torch.dtype) -> int:
        """LowRankAdam's share and the full-size stacks of a run: W (then v'), G, dL/dv and the
        product G v of the magnitude's gradient, at the weights' precision."""
        return super().run_item_bytes(shape, dtype) + 4 * shape[0] * shape[1] * dtype.itemsize

    def state_bytes(self, shape: tuple[int, int], state_dtype: str, param_bytes: int) -> int:
        """LowRankAdam's (2 D r moments + the d r basis) + the magnitude's 2 fp32 m-vectors."""
        return super().state_bytes(shape, state_dtype, param_bytes) + 2 * 4 * shape[0]
