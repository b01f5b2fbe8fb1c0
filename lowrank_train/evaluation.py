"""The training loss and the held-out evaluation (token-weighted, over a fixed set of tokens)."""

from __future__ import annotations

from contextlib import nullcontext

import torch
import torch.nn.functional as F
from torch import nn

from lowrank_train.config import RunConfig
from lowrank_train.data import TokenData, split_block, val_batches


def causal_lm_loss(
    model: nn.Module, inputs: torch.Tensor, labels: torch.Tensor, reduction: str = "mean"
) -> torch.Tensor:
    """Cross-entropy of next-token prediction; labels are already shifted by the loader."""
    logits = model(input_ids=inputs).logits
    return F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), reduction=reduction)


def compute_context(device: torch.device, autocast: torch.dtype | None):
    """bf16 autocast when the run asks for it; no context at all otherwise (cheaper per step)."""
    return torch.autocast(device.type, dtype=autocast) if autocast is not None else nullcontext()


@torch.no_grad()
def evaluate(
    model: nn.Module,
    data: TokenData,
    cfg: RunConfig,
    device: torch.device,
    autocast: torch.dtype | None,
) -> float:
    """Token-weighted mean loss over the fixed held-out tokens (sum of losses / number of tokens)."""
    was_training = model.training
    model.eval()
    total, count = torch.zeros((), device=device, dtype=torch.float64), 0
    for batch in val_batches(
        data.val, cfg.model.seq_len, cfg.train.batch_size, cfg.eval.max_tokens
    ):
        inputs, labels = split_block(batch.to(device))
        with compute_context(device, autocast):
            total += causal_lm_loss(model, inputs, labels, reduction="sum").double()
        count += labels.numel()
    model.train(was_training)
    return (total / count).item()
