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
        allocate_state_(opt)
        return {"adamw": opt}


def allocate_state_(opt: torch.optim.AdamW) -> None:
    """Torch AdamW's state, allocated now instead of at the first step, with the values and
    layout its lazy init gives (zero moments; step a 0-d tensor, fp32 on the parameter's device
    when fused, else on the CPU in the scalar dtype).

    Why: at the first step the caching allocator holds the blocks the backward freed, and a
    moment placed in a larger one keeps up to 1 MiB of it unsplit (1.07 MB of the 350M GaLore
    peak, optim-26b); before the first forward each moment gets a block of its own size, and a
    run that cannot hold its optimizer fails at build instead of at step 0."""
    for group in opt.param_groups:
        on_device = group["fused"] or group["capturable"]
        for p in group["params"]:
            state = opt.state[p]
            if state:
                continue
            if on_device:
                state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
            else:
                scalar = (
                    torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32
                )
                state["step"] = torch.tensor(0.0, dtype=scalar)
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            if group["amsgrad"]:
                state["max_exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)


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
