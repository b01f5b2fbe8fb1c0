"""Loading optimizer state without torch's dtype cast.

`torch.optim.Optimizer.load_state_dict` casts every floating state tensor to its parameter's
dtype (torch/optim/optimizer.py, `_process_value_according_to_param_policy`): with bf16
weights, fp32 moments, bases and quantization scales come back bf16 after a resume, and the
run silently continues with different math. bitsandbytes' optimizers cast the same way.
"""

from __future__ import annotations

from itertools import chain
from typing import Any

import torch


def load_state_dict_keeping_dtypes(optimizer: torch.optim.Optimizer, state_dict: dict) -> None:
    """`optimizer.load_state_dict(state_dict)`, then every state tensor back in its saved dtype.

    Plain values (ints, strings) come back as saved. Tensors stay on the device where torch
    put them (the parameter's; `step` where torch keeps it).
    Restored tensors are the saved ones moved, not the cast ones cast back: bf16 -> fp32 would
    not return the lost bits. As in torch, a saved tensor already on the right device is used
    as it is (no copy), so the optimizer's state and `state_dict` share storage.
    """
    optimizer.load_state_dict(state_dict)
    restore_saved_dtypes(optimizer, state_dict)


def restore_saved_dtypes(optimizer: torch.optim.Optimizer, state_dict: dict) -> None:
    """After torch's `load_state_dict(state_dict)`: every state tensor back in its saved dtype
    (an optimizer's own `load_state_dict` calls this after torch's)."""
    saved_ids = chain.from_iterable(g["params"] for g in state_dict["param_groups"])
    params = chain.from_iterable(g["params"] for g in optimizer.param_groups)
    for saved_id, param in zip(saved_ids, params, strict=True):
        if saved_id in state_dict["state"] and param in optimizer.state:
            optimizer.state[param] = _restore(state_dict["state"][saved_id], optimizer.state[param])


def _restore(saved: Any, loaded: Any) -> Any:
    """`loaded` (torch's cast copy of `saved`) with each tensor in `saved`'s dtype."""
    if isinstance(saved, torch.Tensor) and isinstance(loaded, torch.Tensor):
        return loaded if loaded.dtype == saved.dtype else saved.to(device=loaded.device)
    if isinstance(saved, dict) and isinstance(loaded, dict):
        return {k: _restore(saved[k], v) if k in saved else v for k, v in loaded.items()}
    if isinstance(saved, list | tuple) and type(saved) is type(loaded):
        return type(saved)(_restore(s, v) for s, v in zip(saved, loaded, strict=True))
    # A plain value as saved: torch rebuilds every Iterable with type(value)(generator), which
    # turns a string ("right", a tensor's name) into the text of a generator object.
    return saved
