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
only the targeted Linear weights are projected, and `check` refuses a rank above min(m, n).

State per tensor: `row` (m,) and `col` (n,) fp32, `exp_avg` (M, D x r, in state_dtype, with
`exp_avg_absmax` when 8-bit) and `index` (the resample index, a plain int).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor
from torch.nn import Parameter

from lowrank_train import gemm
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

PARAM_SCALE_FLOOR = 1e-3  # Adafactor's eps2: the relative step of a weight near zero


def rms(x: Tensor, dtype: torch.dtype) -> Tensor:
    """RMS of each matrix of x (its last two dims; a stack gives one a matrix), accumulated
    in `dtype` without an upcast copy of x."""
    return (
        torch.linalg.vector_norm(x, dim=(-2, -1), dtype=dtype) / (x.shape[-2] * x.shape[-1]) ** 0.5
    )


@PROJECTORS.register
class Flora(Projector):
    """Adafactor with a momentum compressed by seeded Gaussian projections, moved at resamples."""

    reads_weight = True  # the update is scaled by max(1e-3, RMS(W))
    run_budget_scale = 4  # its runs stack full-size tensors (base.Projector)

    name = "flora"
    decay_after_update = False  # Adafactor decays the weight before the update
    basis_event = "resample"  # the projection is regenerated from (seed, name, index)

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

    def check(self, shapes: dict[str, tuple[int, int]]) -> None:
        super().check(shapes)
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
        """X B (right) or B^T X (left), padded where X is misaligned on CUDA (`gemm.mm`)."""
        return gemm.mm(x, basis) if side == "right" else gemm.mm(basis.T, x)

    @staticmethod
    def add_up_(x: Tensor, low: Tensor, basis: Tensor, side: str, beta: float, alpha: float):
        """X <- beta X + alpha up(C), up(C) = C B^T (right) or B C (left), in place, by one GEMM
        accumulating onto X (`gemm.addmm`)."""
        a, b = (low, basis.T) if side == "right" else (basis, low)
        gemm.addmm(x, a, b, alpha, inplace=True, beta=beta)

    @staticmethod
    def transport(low: Tensor, old: Tensor, new: Tensor, side: str) -> Tensor:
        """down_new(up_old(M)) through the (r, r) product B_old^T B_new (no full-size image);
        stacks (b, ...) of M and B alike."""
        return low @ (old.mT @ new) if side == "right" else (new.mT @ old) @ low

    # -- the step ----------------------------------------------------------------------------
    # Passes over the m x n gradient are the step's cost, and at 1B the dispatch of its small
    # ops was: a run of same-shape tensors (`Projector.runs`) is stacked once (the copy u is
    # formed in), its row and column statistics are norms of the stack accumulated in fp32 (no
    # G^2 or fp32 copy), u is scaled in place by scales in u's dtype (one vectorized pass
    # each), o is formed over u by one GEMM a tensor, and the clip, the scale and the relative
    # step reach W in one multi-tensor multiply-add.

    def run_parts(
        self, params: list[Tensor], grads: list[Tensor], states: list[State], step: int, hp: dict
    ) -> tuple[Tensor, Tensor, Tensor]:
        """(o, k, relative factor) of a run (`Projector.runs`: one shape, side, step and
        resample index): the Adafactor-Flora outputs before their clip, stacked (b, m, n); k =
        scale / max(1, RMS(o) / clip) and max(1e-3, RMS(W)) (1 without scale_parameter), (b,)
        each, on the device: no host sync. Flora's move is W <- W - lr factor k o (decay
        aside). Each tensor's values are what it gets in a run of its own."""
        o_ = self.options
        dtype = torch.float64 if grads[0].dtype == torch.float64 else torch.float32
        device = grads[0].device
        m, n = grads[0].shape
        u = torch.stack(grads)  # a copy: u is formed in it
        beta2t = 1.0 - step ** (-o_.decay_rate)
        stats = {}
        for key, dim, count in (("row", -1, n), ("col", -2, m)):  # mean(G^2 + eps) per row, col
            mean_sq = torch.linalg.vector_norm(u, dim=dim, dtype=dtype).square_() / count
            ema = torch.stack([s[key] for s in states])
            ema.mul_(beta2t).add_((mean_sq + o_.eps).to(ema.dtype), alpha=1 - beta2t)
            torch._foreach_copy_([s[key] for s in states], list(ema.unbind(0)))
            stats[key] = ema.to(dtype)
        row, col = stats["row"], stats["col"]
        u.mul_((row / row.mean(dim=-1, keepdim=True)).rsqrt()[:, :, None].to(u.dtype))
        u.mul_(col.rsqrt()[:, None, :].to(u.dtype))
        b1 = o_.beta1
        if b1 > 0:
            self.momentum_(u, states, step, hp, dtype)
        o = u
        k = o_.scale / torch.clamp(rms(o, dtype) / o_.clip, min=1.0)
        if o_.scale_parameter:
            rms_w = torch.stack(torch._foreach_norm(params, 2, dtype=dtype)) / (m * n) ** 0.5
            factor = torch.clamp(rms_w, min=PARAM_SCALE_FLOOR)
        else:
            factor = torch.ones(len(params), dtype=dtype, device=device)
        return o, k, factor

    def momentum_(self, u: Tensor, states: list[State], step: int, hp: dict, dtype) -> None:
        """o = (1 - b1) u + b1 up(M_(t-1)) over the stack u, and M_t = b1 M_(t-1) + (1 - b1)
        down(u) stored (transported first at a resample), per tensor of the run."""
        o_, b1 = self.options, self.options.beta1
        side, device, shape = states[0]["side"], u.device, tuple(u.shape[1:])
        m, n = shape
        low_shape = (m, o_.rank) if side == "right" else (o_.rank, n)

        def projections() -> Tensor:
            return torch.stack(
                [self.projection(s, s["index"], shape, dtype, device) for s in states]
            )

        bases = projections()
        momentum = torch.stack(
            [
                read_moment(s, "exp_avg").to(dtype)
                if "exp_avg" in s
                else torch.zeros(low_shape, dtype=dtype, device=device)
                for s in states
            ]
        )
        previous, previous_bases = momentum, bases  # o reads M_(t-1) in the old projection
        if self.needs_refresh(states[0], step):  # one step a run: all or none resample
            for s in states:
                s["index"] += 1
            new = projections()
            if o_.moments_at_refresh == "reset":
                momentum = torch.zeros_like(momentum)
            else:
                momentum = self.transport(momentum, bases, new, side)
            bases = new
        # the projections' GEMMs at u's precision; the D x r momentum's EMA in fp32
        low_u = torch.stack(
            [self.down(x, b.to(u.dtype), side) for x, b in zip(u, bases, strict=True)]
        ).to(dtype)
        momentum = b1 * momentum + (1 - b1) * low_u
        # o written over u (down(u) is already taken), before M_t is stored: an fp32 state
        # read is the state tensor itself, not a copy
        previous, previous_bases = previous.to(u.dtype), previous_bases.to(u.dtype)
        for x, low, basis in zip(u, previous, previous_bases, strict=True):
            self.add_up_(x, low, basis, side, beta=1 - b1, alpha=b1)
        for s, value in zip(states, momentum.float().unbind(0), strict=True):
            write_moment(s, "exp_avg", value, hp["state_dtype"])

    def direction(self, param: Tensor, grad: Tensor, state: State, step: int, hp: dict) -> Tensor:
        """max(1e-3, RMS(W)) k o: W <- W - lr * direction is Flora's move (decay aside)."""
        o, k, factor = self.run_parts([param], [grad], [state], step, hp)
        return o[0].mul_((k * factor)[0])

    def update_(self, param: Tensor, grad: Tensor, state: State, step: int, hp: dict) -> None:
        """One tensor through `update_many_`."""
        self.update_many_([(param, grad, state, step)], hp)

    def update_many_(self, items: list[tuple[Tensor, Tensor, State, int]], hp: dict) -> None:
        """Adafactor's order, run by run: the relative step from RMS(W) before the decay, then
        W <- W - rho wd W and W <- W - rho k o, rho = lr max(1e-3, RMS(W)), each a multi-tensor
        kernel over the run with its coefficients in W's dtype."""
        for run in self.runs(items):
            params = [p for p, _, _, _ in run]
            o, k, factor = self.run_parts(
                params, [g for _, g, _, _ in run], [s for _, _, s, _ in run], run[0][3], hp
            )
            rho = factor * hp["lr"]
            dtype = params[0].dtype
            if hp["weight_decay"]:
                torch._foreach_mul_(params, list((1 - rho * hp["weight_decay"]).to(dtype)))
            torch._foreach_addcmul_(params, list(o.unbind(0)), list((-rho * k).to(dtype)))

    def run_item_bytes(self, shape: tuple[int, int], dtype: torch.dtype) -> int:
        """The run's stack (u, at the gradient's precision) and its padded GEMM copies, with the
        fp32 low-rank momentum, its update and the projections (3 D r)."""
        return 2 * shape[0] * shape[1] * dtype.itemsize + 12 * max(shape) * self.options.rank

    def state_bytes(self, shape: tuple[int, int], state_dtype: str, param_bytes: int) -> int:
        """M of D x r in state_dtype (absent with beta1 0) + the fp32 factored second moment
        (m + n); the resample index is a plain int."""
        m, n = shape
        momentum = moment_bytes(max(m, n) * self.options.rank, state_dtype)
        return (momentum if self.options.beta1 > 0 else 0) + 4 * (m + n)
