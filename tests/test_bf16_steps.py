"""Every projector's step at fp32 and at bf16 weights and gradients (the GPU's paths, which the
float64 references never take: an fp32 state read is the state tensor itself, not a copy, and
Flora's u, Fira's residual, GradNormLoRP's v' and Q-GaLore's update are formed at the
gradient's precision) against the same steps in float64 from the same rounded start.

Seven steps with one refresh (step 1): a later SVD refresh may flip a basis column's sign
between precisions, and with the kept moments (the codes' policy) the runs then part ways
legitimately. Tolerances: fp32 agrees to 1e-4 (fp32 arithmetic over seven steps); bf16 to 8%
(8 significant bits in every weight, gradient and basis; Q-GaLore's INT4 basis of a bf16
gradient is the loosest, at about 5%)."""

from __future__ import annotations

import pytest
import torch
from projector_cases import gradients, initial_weight, run_projector

CASES = {
    "galore": dict(rank=4, svd="exact"),
    "qgalore": dict(rank=4, svd="exact"),
    "fira": dict(rank=4, svd="exact"),
    "gradnormlorp": dict(rank=4, svd="exact"),
    "flora": dict(rank=4),
    "apollo": dict(rank=4),
    "apollo_mini": dict(rank=1),
}
TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 0.08}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("shape", [(48, 32), (32, 48)], ids=["right", "left"])
@pytest.mark.parametrize("name", sorted(CASES))
def test_a_low_precision_step_follows_the_float64_one(name, shape, dtype):
    grads = gradients(shape, 7)
    w0 = initial_weight(shape).to(dtype)
    common = dict(lr=0.1, weight_decay=0.1, update_gap=10, **CASES[name])
    exact, _ = run_projector(name, grads, w0=w0.double(), **common)
    low, opt = run_projector(
        name, [g.to(dtype) for g in grads], w0=w0, state_dtype="float32", **common
    )
    assert low[-1].dtype == dtype
    moved, moved_low = exact[-1] - w0.double(), low[-1].double() - w0.double()
    assert (moved_low - moved).norm() <= TOLERANCE[dtype] * moved.norm()
    (state,) = opt.state.values()
    for key in ("exp_avg", "exp_avg_sq", "row", "col", "limiter_norm", "magnitude_exp_avg"):
        if key in state:
            assert state[key].dtype == torch.float32, key


def run_directions(name: str, grads, w0, lr: float, **options):
    """W <- W - lr D, D = the projector's `direction` (what a quantized weight's writer
    applies), with fp32 state as the optimizer keeps it; refreshes as the optimizer asks."""
    from lowrank_train.projectors import PROJECTORS

    cls = PROJECTORS.get(name)
    projector = cls(cls.Config(**options), seed=0)
    hp = dict(lr=lr, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.0, state_dtype="float32")
    w = w0.clone()
    state = projector.init_state(w, "layer.weight")
    for t, g in enumerate(grads, start=1):
        if projector.needs_refresh(state, t):
            projector.refresh(projector.refresh_input(w, g), state)
        w = w - lr * projector.direction(w, g, state, t, hp).to(w.dtype)
    return w


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("name", sorted(CASES))
def test_a_low_precision_direction_follows_the_float64_one(name, dtype):
    """The writers' path (int8 weights with a projector) at fp32 and bf16 gradients against
    float64, to the same tolerances."""
    grads = gradients((48, 32), 7)
    w0 = initial_weight((48, 32)).to(dtype)
    options = dict(update_gap=10, **CASES[name])
    exact = run_directions(name, grads, w0.double(), 0.1, **options)
    low = run_directions(name, [g.to(dtype) for g in grads], w0, 0.1, **options)
    moved, moved_low = exact - w0.double(), low.double() - w0.double()
    assert (moved_low - moved).norm() <= TOLERANCE[dtype] * moved.norm()
