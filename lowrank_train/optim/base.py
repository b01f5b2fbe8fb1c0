"""Inner optimizers of the dense tensors: `adamw` (torch) and `adamw8bit` (bitsandbytes)."""

from __future__ import annotations

from typing import ClassVar

import torch

from lowrank_train.config import OptimConfig
from lowrank_train.registry import Registry


class InnerOptimizer:
    """Builds the torch optimizers that serve a list of parameter groups."""

    name: ClassVar[str]

    def build(
        self, groups: list[dict], cfg: OptimConfig, device: torch.device
    ) -> dict[str, torch.optim.Optimizer]:
        raise NotImplementedError


OPTIMIZERS: Registry[InnerOptimizer] = Registry("optimizer")


@OPTIMIZERS.register
class AdamW(InnerOptimizer):
    """torch.optim.AdamW; fused on CUDA (one kernel for all tensors). State in the parameter's dtype."""

    name = "adamw"

    def build(self, groups, cfg, device):
        opt = torch.optim.AdamW(
            groups,
            betas=cfg.betas,
            eps=cfg.eps,
            weight_decay=cfg.weight_decay,
            fused=device.type == "cuda",
        )
        return {"adamw": opt}


@OPTIMIZERS.register
class AdamW8bit(InnerOptimizer):
    """bitsandbytes AdamW8bit, with 32-bit moments for embeddings and lm_head.

    8-bit state for embeddings is unstable in pretraining (bitsandbytes' own guidance), so
    groups marked `embedding` go to a 32-bit bitsandbytes AdamW, unless `optim.embeddings_8bit`
    (what the GaLore and Q-GaLore scripts do: one 8-bit optimizer over every tensor).
    Arguments go by keyword: the positional order changed in 0.50. Tensors under 4096 elements
    keep 32-bit state there anyway.
    """

    name = "adamw8bit"

    def build(self, groups, cfg, device):
        import bitsandbytes as bnb  # lazily: 3 s to import, absent on the benchmark machine unless carried

        common = dict(betas=cfg.betas, eps=cfg.eps, weight_decay=cfg.weight_decay)
        out = {}
        keeps_32bit = lambda g: g.get("embedding") and not cfg.embeddings_8bit  # noqa: E731
        eight = [g for g in groups if not keeps_32bit(g)]
        thirty_two = [g for g in groups if keeps_32bit(g)]
        if eight:
            out["adamw8bit"] = bnb.optim.AdamW8bit(
                params=eight, **common
            )  # 8-bit whatever optim_bits says
        if thirty_two:
            out["adamw32bit"] = bnb.optim.AdamW(params=thirty_two, optim_bits=32, **common)
        return out
