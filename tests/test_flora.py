"""Flora against a float64 re-implementation of research/projectors.md section 3.1 (Adafactor
with a compressed, randomly projected momentum, transported at a resample), the checks of
section 3.5, state bytes, one-line refusals, and the tiny model through the CLI (it trains; a
resume through resamples is bitwise)."""

from __future__ import annotations

import pytest
import torch
import yaml
from projector_cases import (
    assert_resume_is_bitwise,
    assert_short_run_learns,
    gradients,
    initial_weight,
    run_projector,
)

from lowrank_train.errors import ConfigError
from lowrank_train.projectors import PROJECTORS
from lowrank_train.projectors.flora import Flora
from lowrank_train.projectors.subspace import gaussian_basis
from lowrank_train.resolve import load_run

# Flora's math runs in float64 on float64 gradients, but the second moment and M are stored
# fp32 between steps: agreement to fp32's precision (a few ulp of 1.2e-7, through 1/sqrt(V)).
FP32 = dict(rtol=2e-5, atol=1e-7)
NAME = "layer.weight"  # run_projector's tensor name: the projections' seed part


def projection(d: int, r: int, index: int) -> torch.Tensor:
    return gaussian_basis(d, r, 0, NAME, index, "cpu").double()


def flora_reference(
    grads,
    w0,
    r,
    kappa,
    b1,
    lr,
    wd=0.0,
    decay=0.8,
    clip=1.0,
    eps=1e-30,
    basis=projection,
    compress=True,
):
    """Section 3.1 in float64, written out per side (left: B is m x r, M is r x n). With
    compress=False the momentum is kept uncompressed (m x n): the r = n orthonormal check."""
    m, n = w0.shape
    left = m < n
    d = min(m, n)
    w = w0.clone()
    row, col = torch.zeros(m, dtype=torch.float64), torch.zeros(n, dtype=torch.float64)
    if compress:
        mom = torch.zeros((r, n) if left else (m, r), dtype=torch.float64)
    else:
        mom = torch.zeros(m, n, dtype=torch.float64)
    index = 0

    def down(x, b):
        return b.T @ x if left else x @ b

    def up(c, b):
        return b @ c if left else c @ b.T

    out = []
    for t, g in enumerate(grads, start=1):
        sq = g * g + eps
        beta2 = 1 - t ** (-decay)
        row = beta2 * row + (1 - beta2) * sq.mean(dim=1)
        col = beta2 * col + (1 - beta2) * sq.mean(dim=0)
        u = g / torch.sqrt(torch.outer(row, col) / row.mean())
        if compress:
            b = basis(d, r, index)
            o = (1 - b1) * u + b1 * up(mom, b)
            if t % kappa == 0:  # transport: decompress with the old B, compress with the new
                index += 1
                new = basis(d, r, index)
                mom = down(up(mom, b), new)
                b = new
            mom = b1 * mom + (1 - b1) * down(u, b)
        else:
            o = (1 - b1) * u + b1 * mom
            mom = b1 * mom + (1 - b1) * u
        o = o / max(1.0, float(o.norm() / o.numel() ** 0.5) / clip)
        rho = lr * max(1e-3, float(w.norm() / w.numel() ** 0.5))
        w = w * (1 - rho * wd) - rho * o  # Adafactor: decay before the update, by rho
        out.append(w.clone())
    return out


@pytest.mark.parametrize("beta1", [0.9, 0.0], ids=["flora", "adafactor"])
@pytest.mark.parametrize("shape", [(24, 16), (16, 24)])  # right side, then left
def test_flora_matches_the_float64_reference_through_resamples(shape, beta1):
    """kappa 3 over 8 steps: resamples at steps 3 and 6, with decay 0.1 (before the update)."""
    grads = gradients(shape, 8)
    w0 = initial_weight(shape, std=0.02)
    ours, opt = run_projector(
        "flora", grads, rank=4, update_gap=3, beta1=beta1, w0=w0, weight_decay=0.1
    )
    ref = flora_reference(grads, w0, 4, 3, beta1, 1e-2, wd=0.1)
    (state,) = opt.state.values()
    assert state["index"] == (2 if beta1 > 0 else 0)
    assert ("exp_avg" in state) == (beta1 > 0)
    for a, b in zip(ours, ref, strict=True):
        torch.testing.assert_close(a, b, **FP32)


def orthonormal(d: int, r: int, seed: int = 5) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.linalg.qr(torch.randn(d, r, generator=gen, dtype=torch.float64))[0]


@pytest.mark.parametrize("shape", [(20, 12), (12, 20)])
def test_an_orthonormal_full_rank_projection_is_uncompressed_momentum(monkeypatch, shape):
    """B orthonormal with r = d (the same B at every resample, kappa 2): up(M) is the
    uncompressed momentum, and every transport B^T B = I is the identity."""
    d = min(shape)
    q = orthonormal(d, d)
    monkeypatch.setattr(Flora, "projection", lambda self, s, i, sh, dt, dev: q.to(dt))
    grads = gradients(shape, 6)
    w0 = initial_weight(shape, std=0.02)
    ours, _ = run_projector("flora", grads, rank=d, update_gap=2, w0=w0)
    ref = flora_reference(grads, w0, d, 2, 0.9, 1e-2, compress=False)
    for a, b in zip(ours, ref, strict=True):
        torch.testing.assert_close(a, b, **FP32)


@pytest.mark.parametrize("side", ["right", "left"])
def test_transport_with_the_same_orthonormal_basis_is_the_identity(monkeypatch, side):
    q = orthonormal(12, 4)
    low = torch.randn((20, 4) if side == "right" else (4, 20), dtype=torch.float64)
    torch.testing.assert_close(Flora.transport(low, q, q, side), low, rtol=1e-13, atol=1e-14)
    # through the optimizer: resampling every 2 steps to the same B equals never resampling
    monkeypatch.setattr(Flora, "projection", lambda self, s, i, sh, dt, dev: q.to(dt))
    shape = (20, 12) if side == "right" else (12, 20)
    grads = gradients(shape, 6)
    w0 = initial_weight(shape, std=0.02)
    resampled, _ = run_projector("flora", grads, rank=4, update_gap=2, w0=w0)
    kept, _ = run_projector("flora", grads, rank=4, update_gap=100, w0=w0)
    for a, b in zip(resampled, kept, strict=True):
        torch.testing.assert_close(a, b, **FP32)


def test_the_projection_is_regenerated_bit_for_bit_from_the_saved_index():
    """Only the index is stored; B of that index comes back identical whatever the global RNG
    did in between, and a new index gives a new matrix."""
    grads = gradients((24, 16), 7)
    _, opt = run_projector("flora", grads, rank=4, update_gap=3, seed=11)
    (state,) = opt.state.values()
    assert state["index"] == 2
    assert not any(torch.is_tensor(v) and v.shape == (16, 4) for v in state.values())
    flora = Flora(Flora.Config(rank=4), seed=11)
    first = flora.projection(state, 2, (24, 16), torch.float32, "cpu")
    torch.manual_seed(123)
    torch.randn(1000)
    again = flora.projection(state, 2, (24, 16), torch.float32, "cpu")
    assert torch.equal(first, again)
    assert torch.equal(first, gaussian_basis(16, 4, 11, NAME, 2, "cpu"))
    assert not torch.equal(first, flora.projection(state, 1, (24, 16), torch.float32, "cpu"))


def test_compression_is_unbiased_over_resamples():
    """E_B[up(down(X))] = X B B^T averages to X (entries N(0, 1/r): E[B B^T] = I), within 4
    standard errors over 1,000 projections (research 3.5)."""
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(6, 16, generator=gen, dtype=torch.float64)
    draws = torch.stack(
        [x @ (b @ b.T) for b in (projection(16, 4, i) for i in range(1000))]
    )  # (1000, 6, 16)
    error = (draws.mean(dim=0) - x).abs()
    standard_error = draws.std(dim=0) / 1000**0.5
    assert (error < 4 * standard_error + 1e-12).float().mean() > 0.99


def test_state_bytes_match_the_tensors_in_state():
    for state_dtype in ("float32", "bfloat16", "int8"):
        for beta1 in (0.9, 0.0):
            grads = [g.float() for g in gradients((40, 24), 3)]
            _, opt = run_projector(
                "flora", grads, rank=5, update_gap=2, beta1=beta1, state_dtype=state_dtype
            )
            (state,) = opt.state.values()
            stored = sum(t.numel() * t.element_size() for t in state.values() if torch.is_tensor(t))
            formula = Flora(Flora.Config(rank=5, beta1=beta1)).state_bytes((40, 24), state_dtype, 4)
            assert stored == formula, (state_dtype, beta1, stored, formula)


def test_8bit_momentum_tracks_the_fp32_one():
    grads = gradients((64, 48), 6)
    w0 = initial_weight((64, 48), std=0.02)
    exact, _ = run_projector("flora", grads, rank=8, update_gap=3, w0=w0)
    low, opt = run_projector("flora", grads, rank=8, update_gap=3, w0=w0, state_dtype="int8")
    (state,) = opt.state.values()
    assert state["exp_avg"].dtype == torch.uint8
    # the 8-bit dynamic map: ~1e-2 per value, averaged over the update
    error = (low[-1] - exact[-1]).norm() / (exact[-1] - w0).norm()
    assert error < 5e-2, error


def test_flora_defaults_are_the_official_ones():
    cfg = PROJECTORS.get("flora").Config()
    assert (cfg.rank, cfg.update_gap, cfg.beta1, cfg.decay_rate, cfg.clip) == (
        128,
        1000,
        0.9,
        0.8,
        1.0,
    )
    assert (cfg.scale_parameter, cfg.eps, cfg.scale, cfg.moments_at_refresh) == (
        True,
        1e-30,
        1.0,
        "keep",
    )
    assert Flora.decay_after_update is False


@pytest.mark.parametrize(
    "override, expected",
    [
        (
            "optim.projector.svd=exact",
            "optim.projector.svd: 'exact' does not apply to projector flora",
        ),
        ("optim.projector.moments_at_refresh=rotate", "'rotate' is not one of keep, reset"),
        ("optim.projector.beta1=1.0", "optim.projector.beta1: 1.0 must be in [0, 1)"),
    ],
)
def test_flora_refuses_keys_that_do_not_apply_in_one_line(tmp_path, override, expected):
    run = tmp_path / "run.yaml"
    run.write_text(
        yaml.safe_dump({"train": {"steps": 3}, "optim": {"projector": {"name": "flora"}}})
    )
    with pytest.raises(ConfigError) as info:
        load_run(run, ["optim.projector.rank=8", override])
    assert expected in str(info.value) and "\n" not in str(info.value)


# -- the tiny model through the CLI ---------------------------------------------------------------

FLORA = {"optim": {"projector": {"name": "flora", "rank": 8, "update_gap": 3}}}


def test_flora_trains_the_tiny_model(tiny_run):
    assert_short_run_learns(tiny_run, "flora_trains", FLORA)


def test_resume_through_resamples_is_bitwise(tiny_run):
    """Stopped at step 5 and resumed: the resamples at steps 6 and 9 regenerate the projections
    from the restored index, and every weight matches the uninterrupted run."""
    extra = {**FLORA, "train": {"steps": 10}, "checkpoint": {"every": 5}}
    assert_resume_is_bitwise(tiny_run, extra, stop_at=5, refreshes=[3, 6, 9])
