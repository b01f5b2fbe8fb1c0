"""Launcher checks shared by the Triton modules: each failure is one ValueError line, raised
before any launch, so bad input never reaches Triton (whose errors are pages long)."""

from __future__ import annotations

import os

import torch
from torch import Tensor

FLOATS = (torch.float32, torch.bfloat16, torch.float16)


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def check_tensor(name: str, t: Tensor, dtypes, *, contiguous: bool = True) -> None:
    if not isinstance(t, Tensor):
        raise ValueError(f"{name} must be a tensor, got {type(t).__name__}")
    if t.dtype not in dtypes:
        allowed = ", ".join(str(d).removeprefix("torch.") for d in dtypes)
        raise ValueError(
            f"{name} has dtype {str(t.dtype).removeprefix('torch.')}; expected {allowed}"
        )
    if contiguous and not t.is_contiguous():
        raise ValueError(f"{name} must be contiguous (call .contiguous()); strides {t.stride()}")
    if t.device.type != "cuda" and not interpreting():
        raise ValueError(
            f"{name} is on {t.device}: the Triton kernels need CUDA tensors (or TRITON_INTERPRET=1)"
        )


def check_same_device(**tensors: Tensor) -> None:
    devices = {t.device for t in tensors.values()}
    if len(devices) > 1:
        raise ValueError(
            "tensors on different devices: "
            + ", ".join(f"{k} on {t.device}" for k, t in tensors.items())
        )


def check_block(block_size: int, name: str = "block_size", lo: int = 16, hi: int = 8192) -> None:
    """Triton tiles are powers of two: the block is one tile row."""
    if (
        not isinstance(block_size, int)
        or block_size < lo
        or block_size > hi
        or block_size & (block_size - 1)
    ):
        raise ValueError(
            f"{name} must be a power of two in [{lo}, {hi}] for the Triton kernels, got {block_size!r}"
        )


def num_blocks(numel: int, block_size: int) -> int:
    return -(-numel // block_size)


def check_scales(name: str, scales: Tensor, numel: int, block_size: int) -> None:
    check_tensor(name, scales, (torch.float32,))
    if scales.numel() != num_blocks(numel, block_size):
        raise ValueError(
            f"{name} has {scales.numel()} entries; {numel} elements in blocks of {block_size} "
            f"need {num_blocks(numel, block_size)}"
        )


def check_numel(name: str, t: Tensor, numel: int) -> None:
    if t.numel() != numel:
        raise ValueError(f"{name} has {t.numel()} elements; expected {numel}")


def check_seed(seed: int, offset: int) -> None:
    if not isinstance(seed, int) or not 0 <= seed < 2**63:
        raise ValueError(f"seed must be an int in [0, 2**63), got {seed!r}")
    if not isinstance(offset, int) or not 0 <= offset < 2**31:
        raise ValueError(f"offset must be an int in [0, 2**31), got {offset!r}")


def rows_per_program(block_size: int, target: int | None = None) -> int:
    """Blocks a program handles: ~4096 elements a tile on a GPU; the interpreter runs each
    program as one numpy step, so there fewer, larger tiles are much faster."""
    target = target or (1 << 16 if interpreting() else 4096)
    return max(1, target // block_size)
