"""Learning-rate schedule: linear warmup, then cosine decay to lr * min_lr_ratio."""

from __future__ import annotations

import math
from functools import partial

import torch
from torch.optim.lr_scheduler import LambdaLR


def lr_factor(step: int, total: int, warmup: int, min_ratio: float) -> float:
    """Multiplier of the peak lr at optimizer step `step` (0-based).

    warmup: (step + 1) / warmup, so step 0 already moves; then
    min_ratio + (1 - min_ratio) * (1 + cos(pi * p)) / 2 with p = (step - warmup) / (total - warmup).
    """
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def warmup_steps(total: int, warmup_ratio: float, warmup_steps: int) -> int:
    return warmup_steps if warmup_steps > 0 else int(warmup_ratio * total)


def build_scheduler(
    optimizer: torch.optim.Optimizer, total: int, warmup: int, min_ratio: float
) -> LambdaLR:
    """One LambdaLR stepped once per optimizer step (never per micro-batch or per layer)."""
    return LambdaLR(optimizer, partial(lr_factor, total=total, warmup=warmup, min_ratio=min_ratio))
