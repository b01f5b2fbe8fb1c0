"""The run's precision: storage dtype and autocast dtype, resolved once per device.

On CUDA, `model.autocast: auto` means bf16 autocast under fp32 weights. On a CPU it means bf16
only where the CPU computes bf16 matmuls natively (avx512_bf16 or AMX): elsewhere torch
emulates them in a scalar fallback (`cpublas_gemm_impl`), measured 60-90x slower than fp32 on
AVX2-only EPYCs, which made `make train` look hung. An explicit `bfloat16` still runs there,
after one warning line that gives the slowdown a timed probe found.
"""

from __future__ import annotations

import functools
import logging
import time
from dataclasses import dataclass

import torch

from lowrank_train.config import ModelConfig

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class Precision:
    dtype: torch.dtype  # storage of weights and gradients
    autocast: torch.dtype | None  # compute dtype of the matmuls (None: off)
    reason: str  # why, in words, for the start line

    def record(self) -> dict[str, str]:
        """What a checkpoint stores, so a resume can refuse a different resolution."""
        return {"dtype": _name(self.dtype), "autocast": _name(self.autocast)}


def _name(dtype: torch.dtype | None) -> str:
    return "off" if dtype is None else str(dtype).removeprefix("torch.")


def cpu_has_native_bf16() -> bool:
    """torch's own answer: AVX512-BF16 or AMX tiles, the paths oneDNN runs bf16 GEMMs on."""
    return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())


@functools.cache
def bf16_slowdown() -> float:
    """Median time of a bf16 matmul over the same fp32 one, on this CPU (a ~0.1 s probe)."""
    a, b = torch.randn(128, 256), torch.randn(256, 128)

    def median_s(x: torch.Tensor, y: torch.Tensor) -> float:
        x @ y  # warm-up: first calls pick kernels
        times = []
        for _ in range(5):
            start = time.perf_counter()
            x @ y
            times.append(time.perf_counter() - start)
        return sorted(times)[2]

    return median_s(a.bfloat16(), b.bfloat16()) / max(median_s(a, b), 1e-9)


def resolve_precision(cfg: ModelConfig, device: torch.device) -> Precision:
    """(storage dtype, autocast dtype, reason) by DESIGN.md's precision rules."""
    on_cuda = device.type == "cuda"
    dtype = DTYPES.get(cfg.dtype) or (torch.bfloat16 if on_cuda else torch.float32)
    if cfg.autocast == "off":
        return Precision(dtype, None, "model.autocast=off")
    if cfg.autocast == "bfloat16":
        return Precision(dtype, torch.bfloat16, "model.autocast=bfloat16")
    if dtype != torch.float32:
        return Precision(dtype, None, f"auto: weights are already {_name(dtype)}")
    if on_cuda:
        return Precision(dtype, torch.bfloat16, "auto: bf16 autocast under fp32 weights on CUDA")
    if device.type == "cpu" and cpu_has_native_bf16():
        return Precision(dtype, torch.bfloat16, "auto: this CPU has native bf16 matmul")
    return Precision(
        dtype, None, "auto: this CPU has no native bf16 matmul (no avx512_bf16 or AMX), so fp32"
    )


def warn_if_emulated(precision: Precision, device: torch.device) -> None:
    """One line at start when an explicit bf16 autocast runs on a CPU that emulates it."""
    if device.type == "cpu" and precision.autocast is not None and not cpu_has_native_bf16():
        log.warning(
            "bf16 matmuls are emulated on this CPU (no avx512_bf16 or AMX): a probe found them "
            "%.0fx slower than fp32; model.autocast=auto (or off) trains in fp32",
            bf16_slowdown(),
        )
