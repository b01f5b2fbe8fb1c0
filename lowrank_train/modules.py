"""Facts about torch modules that several packages need (the optimizer routing, the model's
init), kept here so that `optim` does not import `models`."""

from __future__ import annotations

from torch import nn


def is_norm(module: nn.Module) -> bool:
    """LlamaRMSNorm and friends, recognised by class name (HF defines one class per model)."""
    return type(module).__name__.endswith(("RMSNorm", "LayerNorm"))
