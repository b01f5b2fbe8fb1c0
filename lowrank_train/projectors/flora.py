"""Flora (Hao, Cao, Mou, ICML 2024, arXiv 2402.03293): Adafactor with a compressed, randomly
projected first moment, as its official PyTorch code does it (research/projectors.md section 3).

Right side when m >= n (B is n x r: down(X) = X B, up(C) = C B^T, M is m x r), left otherwise
(B is m x r, the code's A^T: down(X) = B^T X, up(C) = B C, M is r x n). B has entries N(0, 1/r)
(E[B B^T] = I), drawn from (run seed, tensor name, resample index) on the CPU and regenerated at
every use: only the index is in state. Per step t (1-based, per tensor):
    beta2_t = 1 - t^(-decay_rate)
    row <- beta2_t row + (1 - beta2_t) mean_cols(G^2 + eps)            (m,)
    col <- beta2_t col + (1 - beta2_t) mean_rows(G^2 + eps)            (n,)
    u = G / sqrt(row col^T / mean(row))                                Adafactor's factored V
    o = (1 - b1) u + b1 up_s(M_(t-1))                                  the current u uncompressed
    if t mod kappa == 0: M_(t-1) <- down_s'(up_s(M_(t-1))), s <- s'    transport to a new B
    M_t = b1 M_(t-1) + (1 - b1) down_s(u)
    o <- o / max(1, RMS(o) / clip);  o <- scale * o
    rho = lr max(1e-3, RMS(W)) if scale_parameter else lr               Adafactor's relative step
    W <- W - rho wd W;  W <- W - rho o                                 decay before the update
The output reads M_(t-1) with the old projection before the transport, as the code orders it;
the clip applies to o (research 3.1 step 6). Transport as the PyTorch code (decompress with the
old B, compress with the new); the JAX code differs (research 3.1) and is not offered. The code
seeds parameter i with seed + i and advances the seed by a generator chain; here the seed is
derived from (run seed, tensor name, index), so it does not depend on parameter order or device.

Keys: `rank` (tau; the JAX config's 128, replicate.sh uses 256), `update_gap` (kappa, 1000),
`beta1` (0.9; Flora's own key, not optim.betas[0]: the betas configure the dense tensors' Adam,
whose beta2 has no meaning here; 0 gives plain factored Adafactor with no momentum state),
`decay_rate` (0.8), `clip` (1.0), `scale_parameter` (true), `eps` (1e-30, Adafactor's eps1; the
1e-3 floor of RMS(W) is its eps2), `scale` (a multiplier of o; Flora has no alpha: 1).
`moments_at_refresh`: keep (transport, the code) or reset (zero M at a resample); no rotate
(keep already re-expresses M in the new projection). There is no `svd` key.
`optim.name` governs only the dense tensors; `optim.state_dtype` stores M (fp32, bf16 or 8-bit
dynamic-map codes); the factored second moment is fp32. Weight decay scales by the relative step
rho, as Adafactor's; a caller applying `direction` alone (W - lr D) decays by its own lr.
The code's filter (min(m, n) >= r, max/min <= 4, to skip embeddings) is the run's targeting:
only the targeted Linear weights are projected, and `validate` refuses a rank above min(m, n).

State per tensor: `row` (m,) and `col` (n,) fp32, `exp_avg` (M, D x r, in state_dtype, with
`exp_avg_absmax` when 8-bit) and `index` (the resample index, a plain int).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import torch
from torch import Tensor
from torch.nn import Parameter

from lowrank_train.config import knob
from lowrank_train.errors import ConfigError
from lowrank_train.projectors.base import (
    PROJECTORS,
    LowRankOptions,
    Projector,
    State,
    moment_bytes,
    read_moment,
    write_moment,
)
from lowrank_train.projectors.subspace import gaussian_basis, side_of

if TYPE_CHECKING:
    from lowrank_train.config import RunConfig

PARAM_SCALE_FLOOR = 1e-3  # Adafactor's eps2: the relative step of a weight near zero


def rms(x: Tensor, dtype: torch.dtype) -> Tensor:
    """RMS(x), accumulated in `dtype` without an upcast copy of x."""
    return torch.linalg.vector_norm(x, dtype=dtype) / x.numel() ** 0.5


@PROJECTORS.register
class Flora(Projector):
    """Adafactor with a momentum compressed by seeded Gaussian projections, moved at resamples."""

    reads_weight = True  # the update is scaled by max(1e-3, RMS(W))

    name = "flora"
    decay_after_update = False  # Adafactor decays the weight before the update

    @dataclass
    class Config(LowRankOptions):
        # JAX configs/optimizer/flora.yaml: tau 128, kappa 1000, b1 0.9, decay 0.8, clip 1.0,
        # parameter scaling on (replicate.sh: tau 256); no LLaMA/C4 recipe exists
        rank: int = knob(128, "tau: rank of the compressed momentum")
        update_gap: int = knob(1000, "kappa: steps between resamples of the projection")
        scale: float = knob(1.0, "multiplier of the update (Flora has no alpha: 1)")
        beta1: float = knob(0.9, "momentum of the compressed first moment (0: plain Adafactor)")
        decay_rate: float = knob(0.8, "Adafactor's second-moment decay: beta2_t = 1 - t^-rate")
        clip: float = knob(1.0, "Adafactor's update clip: o / max(1, RMS(o) / clip)")
        scale_parameter: bool = knob(True, "relative step: lr times max(1e-3, RMS(W))")
        eps: float = knob(1e-30, "Adafactor's eps1, added to G^2")
        moments_at_refresh: Literal["keep", "reset"] = knob(
            "keep", "M at a resample: keep (transported into the new projection, the code) or reset"
        )

    def validate(self, cfg: RunConfig) -> None:
        super().validate(cfg)
        o = self.options
        if not 0 <= o.beta1 < 1:
            raise ConfigError(f"optim.projector.beta1: {o.beta1} must be in [0, 1)")
        if not o.decay_rate > 0:
            raise ConfigError(f"optim.projector.decay_rate: {o.decay_rate} must be > 0")
        if not o.clip > 0:
            raise ConfigError(f"optim.projector.clip: {o.clip} must be > 0")

    def init_state(self, param: Parameter, name: str) -> State:
        m, n = param.shape
        return {
            "side": side_of((m, n)),
            "name": name,
            "index": 0,
            "row": torch.zeros(m, device=param.device),
            "col": torch.zeros(n, device=param.device),
        }

    def needs_refresh(self, state: State, step: int) -> bool:
        """Resamples on steps kappa, 2 kappa, ... (t mod kappa == 0, the code's test); the
        transport itself happens inside `direction`, after the output has read M_(t-1)."""
        return step % self.options.update_gap == 0

    def refresh(self, grad: Tensor, state: State) -> None:
        """Nothing to compute from the gradient: the next projection is a function of the
        resample index, which `direction` advances (the optimizer logs the resample)."""

    def projection(self, state: State, index: int, shape, dtype: torch.dtype, device) -> Tensor:
        """B of resample `index`, (d, r) with entries N(0, 1/r), regenerated bit for bit."""
        d = min(shape)
        basis = gaussian_basis(d, self.options.rank, self.seed, state["name"], index, device)
        return basis.to(dtype)

    @staticmethod
    def down(x: Tensor, basis: Tensor, side: str) -> Tensor:
        return x @ basis if side == "right" else basis.T @ x

    @staticmethod
    def up(low: Tensor, basis: Tensor, side: str) -> Tensor:
        return low @ basis.T if side == "right" else basis @ low

    @staticmethod
    def transport(low: Tensor, old: Tensor, new: Tensor, side: str) -> Tensor:
        """down_new(up_old(M)) through the (r, r) product B_old^T B_new (no full-size image)."""
        return low @ (old.T @ new) if side == "right" else (new.T @ old) @ low

    # -- the step ----------------------------------------------------------------------------
    # Passes over the m x n gradient are the step's cost: the row and column statistics are
    # norms accumulated in fp32 (no G^2 or fp32 copy of G), u is the one full-size temporary
    # (at the gradient's precision, so the projections are GEMMs of that dtype), o is formed in
    # place over it by one GEMM (addmm_), and the clip, the scale and the relative step reach W
    # in one fused multiply-add.

    def step_parts(self, param: Tensor, grad: Tensor, state: State, step: int, hp: dict):
        """(o, k, relative factor): the Adafactor-Flora output before its clip, k = scale /
        max(1, RMS(o) / clip), and max(1e-3, RMS(W)) (1 without scale_parameter), the last two
        0-d tensors: no host sync. Flora's move is W <- W - lr factor k o (decay aside)."""
        o_ = self.options
        dtype = torch.float64 if grad.dtype == torch.float64 else torch.float32
        side = state["side"]
        m, n = grad.shape
        beta2t = 1.0 - step ** (-o_.decay_rate)
        for key, dim, count in (("row", 1, n), ("col", 0, m)):  # mean(G^2 + eps) per row, column
            mean_sq = torch.linalg.vector_norm(grad, dim=dim, dtype=dtype).square_() / count
            state[key].mul_(beta2t).add_((mean_sq + o_.eps).to(state[key].dtype), alpha=1 - beta2t)
        row, col = state["row"].to(dtype), state["col"].to(dtype)
        # u at the gradient's precision (bf16 on the GPU, as the other projectors' passes),
        # each product computed in fp32 from the fp32 factors and rounded once per element
        u = torch.mul(grad, (row / row.mean()).rsqrt()[:, None], out=torch.empty_like(grad))
        u.mul_(col.rsqrt()[None, :])
        b1 = o_.beta1
        if b1 > 0:
            basis = self.projection(state, state["index"], grad.shape, dtype, grad.device)
            low_shape = (m, o_.rank) if side == "right" else (o_.rank, n)
            momentum = (
                read_moment(state, "exp_avg").to(dtype)
                if "exp_avg" in state
                else torch.zeros(low_shape, dtype=dtype, device=grad.device)
            )
            previous, previous_basis = momentum, basis  # o reads M_(t-1) in the old projection
            if self.needs_refresh(state, step):
                state["index"] += 1
                new = self.projection(state, state["index"], grad.shape, dtype, grad.device)
                if o_.moments_at_refresh == "reset":
                    momentum = torch.zeros_like(momentum)
                else:
                    momentum = self.transport(momentum, basis, new, side)
                basis = new
            # the projections' GEMMs at u's precision; the D x r momentum's EMA in fp32
            low_u = self.down(u, basis.to(u.dtype), side).to(dtype)
            momentum = b1 * momentum + (1 - b1) * low_u
            # o = (1 - b1) u + b1 up(M_(t-1)), written over u (down(u) is already taken), and
            # before M_t is stored: an fp32 state read is the state tensor itself, not a copy
            previous, previous_basis = previous.to(u.dtype), previous_basis.to(u.dtype)
            if side == "right":
                u.addmm_(previous, previous_basis.T, beta=1 - b1, alpha=b1)
            else:
                u.addmm_(previous_basis, previous, beta=1 - b1, alpha=b1)
            write_moment(state, "exp_avg", momentum.float(), hp["state_dtype"])
        o = u
        k = o_.scale / torch.clamp(rms(o, dtype) / o_.clip, min=1.0)
        if o_.scale_parameter:
            factor = torch.clamp(rms(param, dtype), min=PARAM_SCALE_FLOOR)
        else:
            factor = torch.ones((), dtype=dtype, device=grad.device)
        return o, k, factor

    def direction(self, param: Tensor, grad: Tensor, state: State, step: int, hp: dict) -> Tensor:
        """max(1e-3, RMS(W)) k o: W <- W - lr * direction is Flora's move (decay aside)."""
        o, k, factor = self.step_parts(param, grad, state, step, hp)
        return o.mul_(k * factor)

    def update_(self, param: Tensor, grad: Tensor, state: State, step: int, hp: dict) -> None:
        """Adafactor's order: the relative step from RMS(W) before the decay, then
        W <- W - rho wd W and W <- W - rho k o, with rho = lr max(1e-3, RMS(W))."""
        o, k, factor = self.step_parts(param, grad, state, step, hp)
        rho = factor * hp["lr"]
        if hp["weight_decay"]:
            param.mul_((1 - rho * hp["weight_decay"]).to(param.dtype))
        param.addcmul_(o, -rho * k)

    def state_bytes(self, shape: tuple[int, int], state_dtype: str, param_bytes: int) -> int:
        """M of D x r in state_dtype (absent with beta1 0) + the fp32 factored second moment
        (m + n); the resample index is a plain int."""
        m, n = shape
        momentum = moment_bytes(max(m, n) * self.options.rank, state_dtype)
        return (momentum if self.options.beta1 > 0 else 0) + 4 * (m + n)
