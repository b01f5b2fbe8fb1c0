"""Randomness that depends only on names, never on call order or the global RNG.

Every draw a method makes (an init, a support, a projection, a stochastic rounding) comes from
a generator seeded by (run seed, the tensor's name, step or refresh index), so every rank draws
the same numbers and a resumed run draws what the uninterrupted run drew.
"""

from __future__ import annotations

import hashlib

import torch


def derived_seed(*parts: object) -> int:
    """A 63-bit seed from any printable parts: derived_seed(seed, 'model.layers.0.mlp.up_proj')."""
    digest = hashlib.sha256("\x1f".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def generator(*parts: object, device: str | torch.device = "cpu") -> torch.Generator:
    """A torch.Generator seeded by `derived_seed(*parts)`."""
    gen = torch.Generator(device=device)
    gen.manual_seed(derived_seed(*parts))
    return gen
