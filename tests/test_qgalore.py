"""Q-GaLore against a float64 re-implementation of research/projectors.md sections 2.1 and 2.5
(GaLore with the basis through INT4 and the lazy gap rule), the INT4 codes exactly, the gap rule
on synthetic bases, state bytes, and the tiny model through the CLI (it trains; a resume through
a lazy refresh is bitwise)."""

from __future__ import annotations

import math

import pytest
import torch
from projector_cases import (
    assert_resume_is_bitwise,
    assert_short_run_learns,
    gradients,
    run_projector,
)

from lowrank_train.projectors import PROJECTORS
from lowrank_train.projectors.qgalore import QGaLore

# Moment math runs in fp32 (kernels.reference.adam_update), and the quantizer divides in fp32:
# float64 comparisons hold to fp32's precision, amplified by 1/sqrt(V) near eps.
FP32 = dict(rtol=2e-5, atol=1e-7)


def right_basis(g: torch.Tensor, r: int) -> torch.Tensor:
    """Top-r right singular vectors (n x r) as the left ones of G^T: our sign convention."""
    return torch.linalg.svd(g.T, full_matrices=False)[0][:, :r]


def int4_reference(basis: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Symmetric absmax INT4 in groups of 256 in float64 (of the fp32 values the quantizer reads):
    (packed codes, scales, dequantized basis). Nibble q + 8, low nibble first."""
    flat = basis.reshape(-1).float().double()
    numel = flat.numel()
    padded = torch.cat([flat, flat.new_zeros(-numel % 2)])
    groups = torch.cat([padded, padded.new_zeros(-padded.numel() % 256)]).view(-1, 256)
    scales = groups.abs().amax(dim=1) / 7
    safe = torch.where(scales > 0, scales, torch.ones_like(scales))
    v = groups / safe[:, None]
    q = (torch.sign(v) * torch.floor(v.abs() + 0.5)).clamp(-7, 7)
    deq = (q * scales[:, None]).reshape(-1)[:numel].view(basis.shape)
    nibbles = (q + 8).reshape(-1)[: padded.numel()].to(torch.uint8)
    return nibbles[0::2] | (nibbles[1::2] << 4), scales, deq


def qgalore_reference(grads, r, gap, alpha, lr, b1, b2, eps, queue_size, threshold, left=False):
    """Section 2.5 in float64: GaLore's reference with Q <- deq(quant4(Q)) after each refresh and
    the lazy gap; returns the weights after each step and the steps that refreshed."""
    w = torch.zeros_like(grads[0])
    m = v = 0.0
    q = leading = None
    queue: list[float] = []
    out, refreshed = [], []
    for t, g in enumerate(grads, start=1):
        if left:
            g = g.T  # the left case is the transpose of the right one
        if (t - 1) % gap == 0:
            exact = right_basis(g, r)
            if leading is not None:
                queue = (queue + [abs(float(leading @ exact[:, 0]))])[-queue_size:]
                if len(queue) == queue_size and sum(queue) / queue_size >= threshold:
                    gap *= 2
            leading = exact[:, 0]
            q = int4_reference(exact)[2]
            refreshed.append(t)
        low = g @ q
        m = b1 * m + (1 - b1) * low
        v = b2 * v + (1 - b2) * low * low
        c = (1 - b2**t) ** 0.5 / (1 - b1**t)
        step = lr * c * alpha * (m / (v.sqrt() + eps)) @ q.T
        w = w - (step.T if left else step)
        out.append(w.clone())
    return out, refreshed


@pytest.mark.parametrize("shape", [(24, 16), (16, 24)])  # right side, then left
def test_qgalore_matches_the_float64_reference_through_lazy_refreshes(shape):
    """T 2 and a queue of 2 on gradients with a stable dominant subspace: refreshes at steps 1,
    3, 5 (the queue fills, the gap doubles to 4) and 9 (gap 8)."""
    grads = gradients(shape, 10)
    ours, opt = run_projector(
        "qgalore", grads, rank=4, update_gap=2, scale=0.25, svd="exact", queue_size=2
    )
    left = shape[0] < shape[1]
    ref, refreshed = qgalore_reference(grads, 4, 2, 0.25, 1e-2, 0.9, 0.999, 1e-6, 2, 0.4, left)
    assert refreshed == [1, 3, 5, 9]
    (state,) = opt.state.values()
    assert (state["gap"], state["refreshes"], state["queue_count"]) == (8, 4, 2)
    for a, b in zip(ours, ref, strict=True):
        torch.testing.assert_close(a, b, **FP32)


@pytest.mark.parametrize("shape, rank", [((300, 20), 16), ((15, 9), 3)])  # 320 and 27 values
def test_int4_basis_codes_are_exact_and_one_signed_groups_keep_their_range(
    monkeypatch, shape, rank
):
    """Codes against the float64 quantizer with atol 0; scales to fp32's rounding of absmax/7.
    The first group is all positive: symmetric absmax keeps it within half a step (the
    official zero-point quantizer clips it, research 2.4)."""
    gen = torch.Generator().manual_seed(1)
    basis = torch.randn(shape[1], rank, generator=gen, dtype=torch.float64)
    basis.view(-1)[:256] = basis.view(-1)[:256].abs()
    monkeypatch.setattr(QGaLore, "new_basis", lambda self, g, s: basis)
    _, opt = run_projector("qgalore", gradients(shape, 1), rank=rank, svd="exact")
    (state,) = opt.state.values()
    codes, scales, deq = int4_reference(basis)
    assert state["basis_codes"].dtype == torch.uint8
    assert state["basis_codes"].numel() == math.ceil(basis.numel() / 2)  # two codes a byte
    torch.testing.assert_close(state["basis_codes"], codes, atol=0, rtol=0)
    torch.testing.assert_close(state["basis_scales"].double(), scales, rtol=1.2e-7, atol=0)  # 2^-23
    used = QGaLore(QGaLore.Config(rank=rank)).basis_of(state, torch.float64)
    torch.testing.assert_close(used, deq, rtol=2.5e-7, atol=0)  # scale and product rounded
    first = slice(0, min(256, basis.numel()))
    error = (used.reshape(-1)[first] - basis.reshape(-1)[first]).abs().max()
    assert error <= scales[0] / 2 * (1 + 1e-6)


def step_through(opt, grads) -> list[tuple[int, int]]:
    """(gap, refreshes) after each of further steps of a run_projector optimizer."""
    (w,) = opt.param_groups[0]["params"]
    out = []
    for g in grads:
        w.grad = g.clone()
        opt.step()
        (state,) = opt.state.values()
        out.append((state["gap"], state["refreshes"]))
    return out


@pytest.mark.parametrize(
    "flip, signed, grows",
    [(False, False, True), (True, False, True), (True, True, False)],
    ids=["fixed", "sign-flipped |cos|", "sign-flipped signed cos"],
)
def test_gap_doubles_after_five_aligned_refreshes(monkeypatch, flip, signed, grows):
    """Synthetic bases with a fixed leading vector, T 1, queue 5, threshold 0.4: refreshes 2-6
    push five cosines of 1, so the gap doubles at step 6 and again at steps 7 and 9 (the queue
    is not cleared). A copy whose sign flips every refresh still doubles with |cos|, and never
    with the official code's signed cosine (-1 every time)."""
    gen = torch.Generator().manual_seed(2)
    fixed = torch.linalg.qr(torch.randn(8, 3, generator=gen, dtype=torch.float64))[0]
    calls = {"n": 0}

    def synthetic(self, grad, state):
        calls["n"] += 1
        return -fixed if flip and calls["n"] % 2 == 0 else fixed

    monkeypatch.setattr(QGaLore, "new_basis", synthetic)
    grads = gradients((12, 8), 12)
    _, opt = run_projector("qgalore", grads[:1], rank=3, update_gap=1, signed_cosine=signed)
    seen = [(1, 1)] + step_through(opt, grads[1:])
    if grows:
        assert seen[:5] == [(1, t) for t in range(1, 6)]  # five refreshes: four cosines
        assert seen[5:] == [(2, 6), (4, 7), (4, 7), (8, 8), (8, 8), (8, 8), (8, 8)]
    else:
        assert seen == [(1, t) for t in range(1, 13)]


def test_state_bytes_match_the_tensors_in_state():
    for state_dtype in ("float32", "bfloat16", "int8"):
        for shape, rank in (((40, 24), 5), ((15, 9), 3)):  # 120 and 27 (padded) basis values
            grads = [g.float() for g in gradients(shape, 3)]
            _, opt = run_projector(
                "qgalore", grads, rank=rank, update_gap=1, svd="exact", state_dtype=state_dtype
            )
            (state,) = opt.state.values()
            stored = sum(t.numel() * t.element_size() for t in state.values() if torch.is_tensor(t))
            formula = QGaLore(QGaLore.Config(rank=rank)).state_bytes(shape, state_dtype, 4)
            assert stored == formula, (state_dtype, shape, stored, formula)


def test_qgalore_defaults_are_the_official_ones():
    cfg = PROJECTORS.get("qgalore").Config()
    assert (cfg.rank, cfg.update_gap, cfg.scale, cfg.svd) == (128, 200, 0.25, "fast")
    assert (cfg.cos_threshold, cfg.queue_size, cfg.gap_growth, cfg.signed_cosine) == (
        0.4,
        5,
        2,
        False,
    )


# -- the tiny model through the CLI ---------------------------------------------------------------

# T 1, queue 2 and threshold 0 (the gap grows whenever the queue is full): refreshes at steps
# 1, 2, 3 (gap 2), 5 (gap 4), 9 (gap 8) of 10; 8-bit moments and the official betas.
LAZY = {
    "optim": {
        "projector": {
            "name": "qgalore",
            "rank": 8,
            "update_gap": 1,
            "queue_size": 2,
            "cos_threshold": 0.0,
        },
        "state_dtype": "int8",
        "betas": [0.9, 0.95],
    },
}


def test_qgalore_trains_the_tiny_model(tiny_run):
    projector = {"name": "qgalore", "rank": 8, "update_gap": 10}
    assert_short_run_learns(tiny_run, "qgalore_trains", {"optim": {"projector": projector}})


def test_resume_through_a_lazy_refresh_is_bitwise(tiny_run):
    """Stopped at step 6 (gap 4, queue full) and resumed: the refresh at step 9 and every
    weight match the uninterrupted run, so the gap, queue and leading vector were restored."""
    extra = {**LAZY, "train": {"steps": 10}, "checkpoint": {"every": 6}}
    assert_resume_is_bitwise(tiny_run, extra, stop_at=6, refreshes=[1, 2, 3, 5, 9])


@pytest.mark.parametrize("per_tensor", [False, True])
def test_a_step_dequantizes_each_int4_basis_once(monkeypatch, per_tensor):
    """`down` and `add_back` read one dequantized copy a tensor a step (they dequantized it
    twice), in a batched run and in a tensor's own step (per-layer mode), with the weights
    what the two dequantizations gave, bit for bit."""
    from lowrank_train.projectors import qgalore

    grads = gradients((24, 40), 4)
    want, _ = run_projector("qgalore", grads, rank=4, update_gap=2)
    calls = []
    real = qgalore.dequantize_basis
    monkeypatch.setattr(qgalore, "dequantize_basis", lambda *a: calls.append(a[-1]) or real(*a))
    if per_tensor:  # update_ instead of update_many_, as per-layer mode steps a tensor
        monkeypatch.setattr(
            QGaLore,
            "update_many_",
            lambda self, items, hp: [self.update_(p, g, s, t, hp) for p, g, s, t in items],
        )
    got, _ = run_projector("qgalore", grads, rank=4, update_gap=2)
    for w, g in zip(want, got, strict=True):
        assert torch.equal(w, g)
    # the step's reads are in the gradient's dtype (float64 here); a refresh reads fp32
    assert calls.count(torch.float64) == len(grads), calls


def test_a_direction_dequantizes_its_basis_once(monkeypatch):
    """The writers' path (`direction`, as int8 + qgalore steps) reads one dequantized copy for
    `down` and `up`, and holds none after it."""
    from lowrank_train.projectors import qgalore

    grads = gradients((24, 40), 3)
    _, opt = run_projector("qgalore", grads, rank=4, update_gap=10)
    ((w, state),) = opt.state.items()
    calls = []
    real = qgalore.dequantize_basis
    monkeypatch.setattr(qgalore, "dequantize_basis", lambda *a: calls.append(a[-1]) or real(*a))
    group = opt.param_groups[0]
    opt.projector.direction(w.detach(), grads[-1], state, state["step"] + 1, group)
    assert calls == [grads[-1].dtype]
    assert opt.projector._once is None
