"""`int8`: W (out, in) stored as INT8 codes with fp32 group scales and no high-precision master
copy, trained through its writer with stochastic rounding (Q-GaLore, arXiv 2407.08296;
research/parameterizations.md section 5).

Storage, over the row-major flattened W in groups of g = 256 (`weights.group_size`):
    s_b = absmax_b / 127,   c_i = round(w_i / s_b) in [-127, 127],   deq(W)_i = c_i s_b
symmetric absmax (Q-GaLore's code uses a zero-point quantizer whose rounded zero clips groups
of one sign; not done here), so the layer stores mn + 4 ceil(mn / g) bytes: mn + 4mn/256.
The init is the dense draw of the same seed, rounded to nearest.

Forward y = x deq(W)^T (+ b) through `quantized_linear`; the backward adds g^T x into the side
buffer `weight_grad` (out, in) in the run's dtype: a non-persistent buffer, so it moves with
the module but is never saved, counted as a parameter, or listed in `stored_bytes`.

The optimizer reads `weight_grad` as the gradient and `weight()` as the parameter, and writes
    W <- SR(deq(W) - lr * (update + wd * deq(W)))
in fp32 (never bf16: the Q-GaLore code adds in bf16 and loses small updates), block scales
recomputed, one stochastic rounding (`kernels.int8_sr_update`) whose bits come from
(the layer's seed, step); the layer's seed is drawn from the generator of (run seed, layer
name), so every rank and a resumed run round alike.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

from lowrank_train.config import knob
from lowrank_train.distributed import launched_world_size
from lowrank_train.errors import ConfigError
from lowrank_train.kernels import ops as kernels
from lowrank_train.parameterizations.base import (
    PARAMETERIZATIONS,
    Parameterization,
    ParameterizedLinear,
    Writer,
    acquire_storage,
    release_storage,
    released_tensor,
    storage_allocated,
)
from lowrank_train.parameterizations.quantized import (
    dequantized_bytes,
    matmul_knob,
    quantized_linear,
)
from lowrank_train.seeding import derived_seed


class Int8Linear(ParameterizedLinear):
    """y = x deq(codes, scales)^T + b; codes (out, in) int8, scales (ceil(mn / g),) fp32."""

    def __init__(
        self,
        codes: Tensor,
        scales: Tensor,
        bias: Tensor | None,
        group_size: int,
        name: str,
        seed: int,
        grad_dtype: torch.dtype,
        matmul: str = "fused",
    ):
        super().__init__()
        self.matmul = matmul
        self.out_features, self.in_features = codes.shape
        self.group_size, self.name, self.seed = group_size, f"{name}.codes", seed
        self.register_buffer("codes", codes)
        self.register_buffer("scales", scales)
        # born without memory: whoever keeps it resident acquires it (the whole-model optimizer
        # at its build, per-layer stepping around this layer's backward), so a 7B build never
        # holds every layer's m x n buffer at once (13 GB in bf16)
        self.register_buffer(
            "weight_grad", released_tensor(codes.shape, grad_dtype, codes.device), persistent=False
        )
        self.bias = nn.Parameter(bias) if bias is not None else None

    def forward(self, x: Tensor) -> Tensor:
        y = quantized_linear(
            x,
            self.codes,
            self.scales,
            "int8",
            (self.out_features, self.in_features),
            self.group_size,
            self.weight_grad,
            self.matmul,
        )
        return y + self.bias if self.bias is not None else y

    def transient_bytes(self, padded: bool) -> int:
        shape = (self.out_features, self.in_features)
        return dequantized_bytes(shape, self.weight_grad.dtype, self.matmul, padded)

    def _apply(self, fn, recurse=True):
        """Moving or casting the module: a released side buffer has no bytes to copy (torch
        would read past its empty storage), so it is re-created released on the target."""
        grad = self.weight_grad
        if storage_allocated(grad):
            return super()._apply(fn, recurse)
        self._buffers["weight_grad"] = grad.new_empty(0)  # moved and cast by fn like any buffer
        out = super()._apply(fn, recurse)
        moved = self._buffers["weight_grad"]
        self._buffers["weight_grad"] = released_tensor(grad.shape, moved.dtype, moved.device)
        return out

    def dense_weight(self) -> Tensor:
        """deq(W) in fp32, (out, in)."""
        return kernels.dequantize_int8(self.codes, self.scales, self.group_size)

    def writers(self) -> dict[str, Writer]:
        return {"weight": Int8Writer(self)}

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, group_size={self.group_size}, matmul={self.matmul}"
        )


class Int8Writer:
    """The optimizer's view of an Int8Linear's weight (the `Writer` protocol). It reads the
    layer's tensors at each call, so it stays valid when the module moves."""

    def __init__(self, layer: Int8Linear):
        self.layer = layer
        self.name = layer.name

    @property
    def tensor(self) -> Tensor:
        return self.layer.codes

    @property
    def grad(self) -> Tensor:
        return self.layer.weight_grad

    def release_grad(self) -> None:
        release_storage(self.layer.weight_grad)

    def acquire_grad(self) -> None:
        acquire_storage(self.layer.weight_grad)

    def weight(self) -> Tensor:
        return self.layer.dense_weight()

    @torch.no_grad()
    def write(self, update: Tensor, lr: float, wd: float, step: int) -> None:
        """W <- SR(deq(W) - lr * (update + wd * deq(W))), codes and scales rewritten in place."""
        layer = self.layer
        kernels.int8_sr_update(
            layer.codes,
            layer.scales,
            update,
            lr=lr,
            wd=wd,
            seed=derived_seed(layer.seed, step),
            group_size=layer.group_size,
        )


@PARAMETERIZATIONS.register
class Int8(Parameterization):
    """INT8 weights (absmax groups of 256) trained by stochastic rounding, no master copy."""

    name = "int8"

    @dataclass
    class Config:
        group_size: int = knob(256, "elements per fp32 scale, over the row-major flattened W")
        # dequantize: 1.94x the fused kernel's tok/s on llama_1b (bench_params params-1b-8,
        # H200, 2026-12-04), where the fused INT8 kernel runs at 0.52-0.57x cuBLAS from 2,048
        # tokens up; Q-GaLore's code dequantizes too. The 7B per-layer recipes keep fused,
        # faster in that host-bound step (train-7b-4 and -5, 2026-12-01)
        matmul: Literal["fused", "dequantize"] = matmul_knob("dequantize")

    def convert(
        self, linear: nn.Linear, name: str, gen: torch.Generator, dtype: torch.dtype
    ) -> Int8Linear:
        g = self.options.group_size
        w = linear.weight.detach()
        if w.device.type == "meta":  # a structural build: shapes only
            codes = torch.empty(w.shape, dtype=torch.int8, device="meta")
            scales = torch.empty(-(-w.numel() // g), device="meta")
        else:
            codes, scales = kernels.quantize_int8(w.float(), g)
        bias = linear.bias.detach().to(dtype) if linear.bias is not None else None
        seed = int(torch.randint(0, 2**62, (), generator=gen))
        return Int8Linear(codes, scales, bias, g, name, seed, dtype, self.options.matmul)

    def validate(self, cfg) -> None:
        g = self.options.group_size
        if g < 2 or g % 2:
            raise ConfigError(f"weights.group_size: {g} must be an even integer >= 2")
        world = launched_world_size()
        if world > 1:
            raise ConfigError(
                f"weights.name: int8 runs in one process only (WORLD_SIZE={world}): DDP "
                "all-reduces parameters' gradients, not its side-buffer weight gradients"
            )
