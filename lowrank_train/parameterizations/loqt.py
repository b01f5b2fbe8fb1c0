"""`loqt`: LoQT (Loeschcke et al. 2024, arXiv 2405.16528). W is stored 4-bit and frozen between
merges; one factor is trained in a fixed subspace P taken from the gradient:

    y = deq(W_q) x + s B (P^ x)     in <= out: P (r, in) fixed, B (out, r) trained
    y = deq(W_q) x + s P^ (A x)     in > out:  P (out, r) fixed, A (r, in) trained

so the trained factor always spans the larger side (the official code's `proj_type std`); s is
`lora_alpha` taken as it is (no division by r) and P^ = deq(Q(P)) when the projection is
quantized too (the scripts' `--quantize_projection_matrix 4bit`). W_q is NF4 (or INT4) in blocks
of `group_size` over the row-major W, codes and fp32 scales as plain buffers.

Merges (research/parameterizations.md section 4). The steps t_0 = 0, t_1 = T,
t_{k+1} = t_k + T + floor(psi^k) capture G = dL/dW of the whole step (every micro-batch, through
`quantized_linear`'s side buffer, which exists only on those steps), and the factor gets no
gradient there, so the optimizer's update of it is skipped. After such a step:

    W_fp = deq(W_q) + s B P^                     (the layer's function, fp32)
    P    = top-r singular vectors of G on its smaller side (projectors/subspace.py)
    W_0' = W_fp;  for c = 1..C:  Q_c = Q(W_{c-1}'),  B_c = (W_fp - deq(Q_c)) P^+ / s,
                                 W_c' = W_fp - s B_c P^,  e_c = ||W_fp - deq(Q_c) - s B_c P^||_F
    keep the (Q_c, B_c) of the smallest e_c;  C = 0: Q = Q(W_fp), B = 0

(in > out: A_c = P^+ (W_fp - deq(Q_c)) / s). With P^+ the pseudo-inverse, B_c P^ is the
projection of the residual onto P^'s row space, so e_1 <= e_0 = ||W_fp - deq(Q(W_fp))||_F and
the kept error is at most e_0: a merge changes the layer's output by at most e_0 ||x||.

Step 0 is a merge, as in the official code: W_q = Q(dense init) and B = 0 at construction, so
the first merge finds W_fp already representable (e_0 = 0) and only installs P; training starts
in the first gradient's subspace. A merge's event is `{"event": "merge", "step": t + 1, ...}`
for the capture at step index t (the step count after it, as the optimizer's events).

Moments at a merge (`moments_at_merge`). Default `keep`, the official code's (issue 17 and
DESIGN.md: the official code is the default, the other variant a key): nothing touches the
state (the official loop also runs one AdamW step with a zero gradient after the merge, which
decays the moments by beta and moves the factor; here the merge step's update is skipped in
both modes). `reset` empties the factor's optimizer state through `optimizer.param_state`, so
its owner starts it afresh (Adam: zero moments, bias correction from step 1; a projector: a
new basis), as research section 4 recommends: the old moments belong to the previous P's
coordinates and the previous factor, both replaced, and kept moments move the freshly
error-compensated factor by lr m^/(sqrt(v^) + eps) right after the merge.

Merges write into the existing tensors (optimizer state is keyed by tensor identity). The merge
state (merges done, the next merge step, whether the next step captures) lives in buffers, so a
resume through a merge is exact. Between merges no dense high-precision (out, in) tensor of the
layer is resident; a merge step holds the fp32 G of every layer (4 out in bytes each) until
its merge, plus W_fp and the SVD's workspace of one layer at a time. The grad buffer is this
process's own: DDP does not all-reduce it, so `validate` refuses WORLD_SIZE > 1.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lowrank_train.config import knob
from lowrank_train.distributed import launched_world_size
from lowrank_train.errors import ConfigError
from lowrank_train.kernels import ops as kernels
from lowrank_train.parameterizations.base import (
    PARAMETERIZATIONS,
    Parameterization,
    ParameterizedLinear,
)
from lowrank_train.parameterizations.quantized import (
    dequantized_bytes,
    matmul_knob,
    quantized_linear,
)
from lowrank_train.projectors.subspace import finder_call_bytes, side_of, svd_basis
from lowrank_train.seeding import generator

FORMATS = {
    "nf4": (kernels.quantize_nf4, kernels.dequantize_nf4),
    "int4": (kernels.quantize_int4, kernels.dequantize_int4),
}


def next_merge(step: int, merges: int, gap: int, growth: float) -> int:
    """t_{k+1} from t_k = `step` after k + 1 = `merges` merges: t_1 = T,
    t_{k+1} = t_k + T + floor(psi^k) (growth 0 keeps every interval at T after the first)."""
    k = merges - 1
    return step + gap + (math.floor(growth**k) if k >= 1 else 0)


def merge_steps(gap: int, growth: float, until: int) -> list[int]:
    """Every merge step below `until` (0-based indices of the steps that capture G)."""
    steps, k = [0], 1
    while (t := next_merge(steps[-1], k, gap, growth)) < until:
        steps.append(t)
        k += 1
    return steps


def requantize(
    w: Tensor,
    p_hat: Tensor,
    factor_left: bool,
    scale: float,
    iterations: int,
    fmt: str,
    group_size: int,
) -> tuple[Tensor, Tensor, Tensor, list[Tensor]]:
    """The error-aware re-initialisation of a merged W (out, in) (module docstring): returns
    (codes, scales, factor, [e_0, e_1, ..., e_C]); the kept pair has the smallest e_c, c >= 1
    (C = 0: Q(W) and factor 0). factor_left: P^ is (r, in) and the factor B (out, r); else P^
    is (out, r) and the factor A (r, in)."""
    quantize, dequantize = FORMATS[fmt]
    codes, scales = quantize(w, group_size)
    errors = [(w - dequantize(codes, scales, w.shape, group_size)).norm()]
    if iterations == 0:
        r = p_hat.shape[0] if factor_left else p_hat.shape[1]
        factor = w.new_zeros((w.shape[0], r) if factor_left else (r, w.shape[1]))
        return codes, scales, factor, errors
    pinv = torch.linalg.pinv(p_hat)
    target, best = w, None
    for _ in range(iterations):
        q, s = quantize(target, group_size)
        residual = w - dequantize(q, s, w.shape, group_size)
        f = (residual @ pinv if factor_left else pinv @ residual) / scale
        low = scale * (f @ p_hat if factor_left else p_hat @ f)
        errors.append((residual - low).norm())
        if best is None or errors[-1] < errors[best[3]]:  # one host sync an iteration, at merges
            best = (q, s, f, len(errors) - 1)
        target = w - low
    return best[0], best[1], best[2], errors


class LoQTLinear(ParameterizedLinear):
    """y = deq(W_q) x + s B (P^ x) (in <= out) or deq(W_q) x + s P^ (A x) (in > out), + b.

    Buffers: `codes`, `scales` (W_q); `p_codes`, `p_scales` (P quantized) or `projection` (P as
    it is); `merges`, `next_merge`, `capturing` (the schedule, 0-d int64). `factor` is B
    (out, r) or A (r, in). `grad_buffer` ((out, in) fp32, never saved) exists only while the
    next step captures G. Built from a meta `weight`, every tensor is shapes only."""

    def __init__(self, weight: Tensor, bias: Tensor | None, name: str, options, seed: int, dtype):
        super().__init__()
        o = self.options = options
        m, n = self.out_features, self.in_features = weight.shape
        self.name, self.seed, self.factor_left = name, seed, n <= m
        quantize = FORMATS[o.format][0]
        self._register_pair(quantize(weight, o.group_size), "codes", "scales")
        zeros = weight.new_zeros((o.rank, n) if self.factor_left else (m, o.rank))
        if o.quantize_projection:
            self._register_pair(quantize(zeros, o.group_size), "p_codes", "p_scales")
        else:
            self.register_buffer("projection", zeros.to(dtype))
        # step 0 captures: B = 0 and P = 0 until the first merge fills them
        factor = weight.new_zeros((m, o.rank) if self.factor_left else (o.rank, n), dtype=dtype)
        self.factor = nn.Parameter(factor)
        self.bias = nn.Parameter(bias) if bias is not None else None
        for key, value in (("merges", 0), ("next_merge", 0), ("capturing", 1)):
            self.register_buffer(key, torch.tensor(value, device=weight.device))
        self.register_buffer("grad_buffer", None, persistent=False)
        self._merges, self._next = 0, 0
        self.set_capturing(True)
        self.register_load_state_dict_post_hook(lambda module, _: module._sync_schedule())

    def _register_pair(self, tensors: tuple[Tensor, Tensor], *names: str) -> None:
        for key, tensor in zip(names, tensors, strict=True):
            self.register_buffer(key, tensor)

    def _sync_schedule(self) -> None:
        """Python copies of the schedule buffers (the per-step check must not sync the device)
        and a fresh grad buffer if `capturing` says so, after every load."""
        self._merges, self._next = int(self.merges), int(self.next_merge)
        capture = bool(self.capturing)
        self.set_capturing(False)  # drops a buffer holding this process's partial G
        self.set_capturing(capture)

    def set_capturing(self, capture: bool) -> None:
        """Allocate (zeroed, fp32) or free the grad buffer; the `capturing` buffer follows.
        Only a change touches the device (after_step calls this every step)."""
        if capture == (self.grad_buffer is not None):
            return
        shape = (self.out_features, self.in_features)
        self.grad_buffer = torch.zeros(shape, device=self.codes.device) if capture else None
        self.capturing.fill_(int(capture))

    def transient_bytes(self, padded: bool) -> int:
        shape = (self.out_features, self.in_features)
        return dequantized_bytes(shape, self.factor.dtype, self.options.matmul, padded)

    def step_buffer_bytes(self) -> int:
        """The fp32 captured G of a merge step (every run captures at step 0)."""
        return 4 * self.out_features * self.in_features

    def merge_workspace_bytes(self) -> int:
        """A merge's peak beside the captured G: the merged W (fp32) with the basis finder's
        workspace on G (the planner's measured `finder_call_bytes`, cold or warm), or
        later `requantize`'s W, target, residual and low-rank or dequantized temporary (four
        fp32 matrices of W's shape)."""
        shape = (self.out_features, self.in_features)
        matrix = 4 * shape[0] * shape[1]
        o = self.options
        finder = max(
            finder_call_bytes(shape, o.rank, o.svd, warm, torch.float32, 1)
            for warm in (True, False)
        )
        return max(matrix + finder, 4 * matrix)

    def p_hat(self) -> Tensor:
        """P^: the projection the forward uses, in the factor's dtype."""
        if not self.options.quantize_projection:
            return self.projection
        o = self.options
        r = o.rank
        shape = (r, self.in_features) if self.factor_left else (self.out_features, r)
        return FORMATS[o.format][1](
            self.p_codes, self.p_scales, shape, o.group_size, self.factor.dtype
        )

    def forward(self, x: Tensor) -> Tensor:
        o, buffer = self.options, self.grad_buffer
        shape = (self.out_features, self.in_features)
        y = quantized_linear(
            x, self.codes, self.scales, o.format, shape, o.group_size, buffer, o.matmul
        )
        # a capturing step trains no factor: its update is skipped and the merge re-solves it
        factor = self.factor if buffer is None else self.factor.detach()
        p = self.p_hat()
        if self.factor_left:
            low = F.linear(F.linear(x, p), factor)
        else:
            low = F.linear(F.linear(x, factor), p)
        y = y + o.scale * low
        return y + self.bias if self.bias is not None else y

    def low_rank(self, factor: Tensor, p_hat: Tensor) -> Tensor:
        """s B P^ or s P^ A, (out, in), in the inputs' dtype."""
        return self.options.scale * (factor @ p_hat if self.factor_left else p_hat @ factor)

    def merged_weight(self) -> Tensor:
        """W = deq(W_q) + s B P^ (or + s P^ A) in fp32: the layer's function, as one matrix."""
        o, shape = self.options, (self.out_features, self.in_features)
        w = FORMATS[o.format][1](self.codes, self.scales, shape, o.group_size)
        return w + self.low_rank(self.factor.float(), self.p_hat().float())

    def dense_weight(self) -> Tensor:
        """The merged W computed in fp32, cast at the end to the run's dtype (the factor's)."""
        return self.merged_weight().to(self.factor.dtype)

    def projectable(self) -> dict[str, nn.Parameter]:
        return {"factor": self.factor}

    def stored_bytes(self) -> dict[str, int]:
        """Saved tensors only: the grad buffer of a merge step is transient."""
        saved = self.state_dict(keep_vars=True)
        return {name: t.numel() * t.element_size() for name, t in saved.items()}

    def steps_uncompiled(self) -> bool:
        """With `capture_eager`, a capturing step (the grad buffer exists) runs eagerly: its
        graph differs. Step 0 captures, so asked at build time this says whether the run has
        eager steps at all (the planner asks then)."""
        return self.options.capture_eager and self.grad_buffer is not None

    @torch.no_grad()
    def after_step(self, step: int, optimizer: torch.optim.Optimizer) -> list[dict]:
        """After step index `step - 1`: merge if it captured G; then allocate the grad buffer
        if step index `step` is the next merge."""
        events = [self.merge(step, optimizer)] if self.grad_buffer is not None else []
        self.set_capturing(self._next == step)
        return events

    def merge(self, step: int, optimizer: torch.optim.Optimizer) -> dict:
        """Merge, project the captured G, re-quantize with the error-aware init (module
        docstring); frees the grad buffer and moves the schedule on."""
        o, grad = self.options, self.grad_buffer
        self.set_capturing(False)
        k = self._merges
        self._next = next_merge(step - 1, k + 1, o.update_gap, o.growth)
        self._merges = k + 1
        self.merges.fill_(self._merges)
        self.next_merge.fill_(self._next)
        event = {"event": "merge", "step": step, "layer": self.name, "merge": k + 1}
        event["next_step"] = self._next
        if not bool(torch.isfinite(grad).all()):
            return {**event, "skipped": "non-finite gradient: W, P and the factor kept"}
        w = self.merged_weight()
        side = side_of(tuple(grad.shape))
        previous = None  # the fast finder warm-starts from the current P (none before merge 1)
        if k > 0 and o.svd == "fast":
            previous = self.p_hat().float()
            previous = previous.T if self.factor_left else previous
        gen = generator(self.seed, "merge", k)
        basis = svd_basis(grad, side, o.rank, o.svd, previous, gen)
        p = basis.T.contiguous() if self.factor_left else basis
        if o.quantize_projection:
            p_codes, p_scales = FORMATS[o.format][0](p, o.group_size)
            self.p_codes.copy_(p_codes)
            self.p_scales.copy_(p_scales)
        else:
            self.projection.copy_(p)
        codes, scales, factor, errors = requantize(
            w,
            self.p_hat().float(),
            self.factor_left,
            o.scale,
            o.compensation_iterations,
            o.format,
            o.group_size,
        )
        self.codes.copy_(codes)
        self.scales.copy_(scales)
        self.factor.copy_(factor)
        if o.moments_at_merge == "reset":
            optimizer.param_state(self.factor).clear()
        kept = min(errors[1:], default=errors[0])
        return {**event, "quant_error": float(errors[0]), "error": float(kept)}

    def extra_repr(self) -> str:
        o = self.options
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, rank={o.rank}, "
            f"scale={o.scale}, format={o.format}, trained={'B' if self.factor_left else 'A'}"
        )


@PARAMETERIZATIONS.register
class LoQT(Parameterization):
    """W frozen 4-bit, one factor trained in the gradient's subspace, merged on a growing schedule."""

    name = "loqt"

    @dataclass
    class Config:
        # the official scripts: rank 128 / 256 / 256 / 256 / 1024 and lora_alpha 0.4 / 0.5 /
        # 0.5 / 0.25 / 0.5 (60M..7B); T 100 (10000 at 7B), psi 1.2 (1.15 at 7B); C 5 (10 in
        # the "1B" script, 0 at 7B); NF4 W and P in bitsandbytes' blocks of 64
        rank: int = knob(128, "rank r of the trained factor and of P")
        scale: float = knob(0.5, "s (lora_alpha, not divided by r) in y = deq(W_q) x + s B (P x)")
        update_gap: int = knob(
            100, "T: the first merge after step 0; later intervals T + floor(psi^k)"
        )
        growth: float = knob(1.2, "psi of the merge intervals T + floor(psi^k); 0 keeps them at T")
        compensation_iterations: int = knob(
            5, "C: error-aware re-quantizations at a merge, the best kept (0: Q(W), factor 0)"
        )
        format: Literal["nf4", "int4"] = knob("nf4", "4-bit format of W (and of P): nf4 | int4")
        group_size: int = knob(64, "quantization block of W and P (bitsandbytes' 64)")
        quantize_projection: bool = knob(True, "store P 4-bit too, as the official scripts do")
        # dequantize: bitsandbytes' 4-bit training matmul, which the official code runs, and on
        # the H200 our fused NF4 kernel is 5-8x slower than deq + cuBLAS from 256 tokens up
        # (bench_kernels, 2026-12-01)
        matmul: Literal["fused", "dequantize"] = matmul_knob("dequantize")
        svd: Literal["exact", "fast"] = knob(
            "exact",
            "basis finder of P: exact (the official full SVD) or fast (warm subspace iteration)",
        )
        moments_at_merge: Literal["keep", "reset"] = knob(
            "keep", "the factor's optimizer state at a merge: keep (the official code) or reset"
        )
        capture_eager: bool = knob(
            False,
            "train.compile: run capture steps uncompiled (one compiled graph instead of two, "
            "at the eager step's larger activation memory)",
        )

    def convert(
        self, linear: nn.Linear, name: str, gen: torch.Generator, dtype: torch.dtype
    ) -> LoQTLinear:
        """W_q from the dense init (scales fp32); the factor, P (unquantized) and bias in dtype."""
        bias = linear.bias.detach().to(dtype) if linear.bias is not None else None
        seed = int(torch.randint(0, 2**62, (), generator=gen))  # the fast finder's draws
        return LoQTLinear(linear.weight.detach(), bias, name, self.options, seed, dtype)

    def validate(self, cfg) -> None:
        o = self.options
        checks = (
            ("rank", o.rank >= 1, "must be >= 1"),
            ("scale", o.scale > 0, "must be > 0"),
            ("update_gap", o.update_gap >= 1, "must be >= 1"),
            ("growth", o.growth >= 0, "must be >= 0"),
            ("compensation_iterations", o.compensation_iterations >= 0, "must be >= 0"),
            ("group_size", o.group_size >= 2 and o.group_size % 2 == 0, "must be even and >= 2"),
        )
        for key, ok, allowed in checks:
            if not ok:
                raise ConfigError(f"weights.{key}: {getattr(o, key)} {allowed}")
        shapes = target_shapes(cfg)
        smallest = min(min(shape) for shape in shapes)
        if o.rank > smallest:
            raise ConfigError(
                f"weights.rank: {o.rank} is above the smallest dimension of the targeted layers "
                f"({smallest}): P would have more rows than the space it projects"
            )
        for m, n in shapes:
            if (m * n) % 2 or (o.rank * min(m, n)) % 2:
                raise ConfigError(
                    f"weights.rank: {o.rank} with a targeted ({m}, {n}) layer gives an odd number "
                    "of 4-bit codes for W or P (two codes a byte): use an even rank and even sizes"
                )
        world = launched_world_size()
        if world > 1:
            raise ConfigError(
                f"weights.name: loqt runs on one process, not WORLD_SIZE={world}: its merge-step "
                "gradient is a side buffer that DDP does not all-reduce"
            )


def target_shapes(cfg) -> set[tuple[int, int]]:
    """(out, in) of the targeted Linears: attention (hidden, hidden), gate and up
    (intermediate, hidden), down (hidden, intermediate)."""
    from lowrank_train.models import PRESETS  # lazily: models imports this package's registry

    shape = PRESETS[cfg.model.preset]
    h = cfg.model.hidden_size or shape.hidden
    f = cfg.model.intermediate_size or shape.intermediate
    of = {"gate_proj": (f, h), "up_proj": (f, h), "down_proj": (h, f)}
    return {of.get(t, (h, h)) for t in cfg.weights.target}
