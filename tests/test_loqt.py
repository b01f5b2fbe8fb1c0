"""`loqt` (LoQT: frozen 4-bit W, one factor trained in the gradient's subspace, merges with the
error-aware re-quantization) against float64 references written here."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from projector_cases import assert_resume_is_bitwise, assert_short_run_learns, cli, metrics

from lowrank_train.kernels import ops as kernels
from lowrank_train.kernels.reference import NF4_CODE
from lowrank_train.models import build_model
from lowrank_train.optim import build_optimizer
from lowrank_train.optim.multi import MultiOptimizer
from lowrank_train.parameterizations import PARAMETERIZATIONS
from lowrank_train.parameterizations.loqt import LoQTLinear, merge_steps
from lowrank_train.resolve import load_run

LoQT = PARAMETERIZATIONS.get("loqt")
GROUP = 64


def deq64(codes: torch.Tensor, scales: torch.Tensor, shape, fmt: str) -> torch.Tensor:
    """The documented 4-bit formats in float64: two codes a byte (low nibble first), value =
    NF4[c] * s (nf4) or (c - 8) * s (int4), s the scale of the code's block of GROUP."""
    nibbles = torch.stack([codes & 0xF, codes >> 4], dim=1).reshape(-1).long()
    if fmt == "nf4":
        values = torch.tensor(NF4_CODE, dtype=torch.float64)[nibbles]
    else:
        values = (nibbles - 8).double()
    numel = math.prod(shape)
    padded = torch.zeros(scales.numel() * GROUP, dtype=torch.float64)
    padded[:numel] = values
    return (padded.reshape(-1, GROUP) * scales.double()[:, None]).reshape(-1)[:numel].reshape(shape)


def p_hat64(layer: LoQTLinear) -> torch.Tensor:
    o = layer.options
    if not o.quantize_projection:
        return layer.projection.double()
    shape = (o.rank, layer.in_features) if layer.factor_left else (layer.out_features, o.rank)
    return deq64(layer.p_codes, layer.p_scales, shape, o.format)


def w_fp64(layer: LoQTLinear) -> torch.Tensor:
    """deq(W_q) + s B P^ (or + s P^ A) in float64, from the stored tensors."""
    m, n = layer.out_features, layer.in_features
    w = deq64(layer.codes, layer.scales, (m, n), layer.options.format)
    f, p = layer.factor.detach().double(), p_hat64(layer)
    return w + layer.options.scale * (f @ p if layer.factor_left else p @ f)


def make(m: int, n: int, dtype=torch.float32, **options) -> tuple[LoQTLinear, MultiOptimizer]:
    linear = torch.nn.Linear(n, m, bias=True)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        linear.weight.normal_(0.0, 0.02, generator=gen)
        linear.bias.normal_(0.0, 0.1, generator=gen)
    options = {"rank": 4, "update_gap": 2, "scale": 0.5, **options}
    gen = torch.Generator().manual_seed(1)
    layer = LoQT(LoQT.Config(**options)).convert(linear, "layer", gen, dtype)
    opt = MultiOptimizer({"adamw": torch.optim.AdamW(layer.parameters(), lr=1e-2)})
    return layer, opt


def batch(n: int, seed: int) -> torch.Tensor:
    return torch.randn(3, 5, n, generator=torch.Generator().manual_seed(seed)).requires_grad_()


def backward(layer: LoQTLinear, x: torch.Tensor, seed: int) -> torch.Tensor:
    y = layer(x)
    upstream = torch.randn(y.shape, generator=torch.Generator().manual_seed(100 + seed))
    (y * upstream).sum().backward()
    return upstream


def train(layer: LoQTLinear, opt: MultiOptimizer, first: int, last: int) -> list[dict]:
    """Steps first+1..last as the loop takes them (one micro-batch each)."""
    events = []
    for step in range(first + 1, last + 1):
        backward(layer, batch(layer.in_features, step), step)
        opt.step()
        opt.zero_grad(set_to_none=True)
        events += layer.after_step(step, opt)
    return events


SHAPES = [(24, 16), (16, 24), (6, 130)]  # B trained, A trained, A with blocks spanning rows


def test_schedule_is_researchs():
    """t_0 = 0, t_1 = T, t_{k+1} = t_k + T + floor(psi^k): research's list and merge counts
    (39 / 44 / 51 / 54 merges after step 0 in 10K / 20K / 60K / 100K steps, last gap 1120)."""
    steps = merge_steps(100, 1.2, 10_000)
    assert steps[:6] == [0, 100, 201, 302, 403, 505]
    assert len(steps) - 1 == 39 and steps[-1] - steps[-2] == 1120
    assert [len(merge_steps(100, 1.2, t)) - 1 for t in (20_000, 60_000, 100_000)] == [44, 51, 54]
    assert merge_steps(10, 0.0, 45) == [0, 10, 20, 30, 40]


def test_the_layer_merges_on_the_schedule():
    layer, opt = make(24, 16, update_gap=3, growth=1.2)
    events = train(layer, opt, 0, 12)
    # captures at step indices 0, 3, 7 (3 + 3 + 1), 11; each merge logged after its step
    assert [e["step"] for e in events] == [1, 4, 8, 12]
    assert [e["next_step"] for e in events] == [3, 7, 11, 15]
    assert int(layer.merges) == 4 and int(layer.next_merge) == 15


@pytest.mark.parametrize("m, n", SHAPES)
def test_forward_and_factor_gradient_match_float64(m, n):
    layer, opt = make(m, n, rank=2, update_gap=3)
    train(layer, opt, 0, 2)  # a merge installed P and the factor moved: both non-zero
    assert layer.grad_buffer is None and layer.factor.abs().sum() > 0
    x = batch(n, 7)
    y = layer(x)
    x64 = x.detach().double()
    f = layer.factor.detach().double().requires_grad_()
    w = deq64(layer.codes, layer.scales, (m, n), "nf4")
    p = p_hat64(layer)
    low = (x64 @ p.T) @ f.T if layer.factor_left else (x64 @ f.T) @ p.T
    ref = x64 @ w.T + 0.5 * low + layer.bias.detach().double()
    torch.testing.assert_close(y.double(), ref, rtol=1e-5, atol=1e-6)  # fp32 sums of 16-130 terms
    g = torch.randn(y.shape, generator=torch.Generator().manual_seed(3))
    (grad,) = torch.autograd.grad(y, layer.factor, g)
    (ref_grad,) = torch.autograd.grad(ref, f, g.double())
    torch.testing.assert_close(grad.double(), ref_grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(layer.dense_weight().double(), w_fp64(layer), rtol=0, atol=1e-7)


@pytest.mark.parametrize("m, n", SHAPES)
def test_the_captured_gradient_is_dW_summed_over_micro_batches(m, n):
    """On a capture step the grad buffer receives dL/dW of every micro-batch (float64 autograd of
    x W_fp^T), and the factor no gradient: the optimizer skips it."""
    layer, opt = make(m, n)
    train(layer, opt, 0, 2)  # step index 2 captures
    assert layer.grad_buffer is not None
    w = w_fp64(layer).requires_grad_()
    for micro in range(2):
        x = batch(n, 20 + micro)
        upstream = backward(layer, x, micro)
        ((x.detach().double() @ w.T) * upstream.double()).sum().backward()
    assert layer.factor.grad is None
    torch.testing.assert_close(layer.grad_buffer.double(), w.grad, rtol=1e-5, atol=1e-6)


def captured(layer: LoQTLinear, opt: MultiOptimizer, steps: int) -> torch.Tensor:
    """Train to the capture at step index `steps`, run its micro-batch, return G (float64)."""
    train(layer, opt, 0, steps)
    assert layer.grad_buffer is not None
    backward(layer, batch(layer.in_features, 50), 50)
    return layer.grad_buffer.double().clone()


@pytest.mark.parametrize("m, n", SHAPES)
def test_the_projection_is_the_top_r_singular_vectors_of_G(m, n):
    layer, opt = make(m, n, rank=3, quantize_projection=False)
    grad = captured(layer, opt, 2)
    opt.step()
    layer.after_step(3, opt)
    u, _, vh = torch.linalg.svd(grad)
    ref = vh[:3] if layer.factor_left else u[:, :3]  # rows of P (r, in) or columns of P (out, r)
    p = layer.projection.double()
    axis = 1 if layer.factor_left else 0
    signs = torch.sign((p * ref).sum(dim=axis, keepdim=True))  # singular vectors: up to sign
    torch.testing.assert_close(p, ref * signs, rtol=0, atol=1e-5)


@pytest.mark.parametrize("fmt", ["nf4", "int4"])
@pytest.mark.parametrize("m, n", SHAPES)
def test_a_merge_changes_the_output_by_at_most_the_quantization_error(m, n, fmt):
    """Before the merge the layer is W_fp; after it deq(Q*) + s B* P^ = W_fp - E with
    ||E||_F = e_kept <= e_0 = ||W_fp - deq(Q(W_fp))||_F (B_1 P^ is the residual's projection onto
    P^'s row space), so ||y_after - y_before||_F <= e_0 ||X||_2."""
    layer, opt = make(m, n, rank=3, format=fmt, compensation_iterations=5)
    captured(layer, opt, 2)
    x = batch(n, 60).detach()
    before, w_before = layer(x).detach().double(), w_fp64(layer)
    factor_id = id(layer.factor)
    opt.step()
    (event,) = layer.after_step(3, opt)
    after = layer(x).detach().double()
    codes, scales = getattr(kernels, f"quantize_{fmt}")(w_before.float(), GROUP)
    e0 = (w_before - deq64(codes, scales, (m, n), fmt)).norm()
    kept = (w_fp64(layer) - w_before).norm()
    assert kept <= e0 * (1 + 1e-5) and 0 < e0  # fp32 merge arithmetic: ~1e-7 relative
    assert abs(event["quant_error"] - e0) <= 1e-5 * e0 and abs(event["error"] - kept) <= 1e-4 * e0
    x2 = x.reshape(-1, n).double()
    assert (after - before).norm() <= e0 * torch.linalg.matrix_norm(x2, 2) * (1 + 1e-4)
    # the factor is the float64 least-squares solve for the kept codes, in P^'s row (column) space
    p = p_hat64(layer)
    residual = w_before - deq64(layer.codes, layer.scales, (m, n), fmt)
    pinv = torch.linalg.pinv(p)
    ref = (residual @ pinv if layer.factor_left else pinv @ residual) / 0.5
    f = layer.factor.detach().double()
    torch.testing.assert_close(f, ref, rtol=1e-4, atol=1e-6)
    low = f @ p if layer.factor_left else p @ f
    projector = pinv @ p if layer.factor_left else p @ pinv
    in_space = low @ projector if layer.factor_left else projector @ low
    torch.testing.assert_close(in_space, low, rtol=0, atol=1e-9)
    assert id(layer.factor) == factor_id  # in place: the optimizer's state stays keyed by it


def test_a_non_finite_gradient_skips_the_merge_and_keeps_the_schedule():
    layer, opt = make(24, 16)
    captured(layer, opt, 2)
    kept = {
        k: v.clone() for k, v in layer.state_dict().items() if k not in ("merges", "next_merge")
    }
    layer.grad_buffer[0, 0] = float("nan")
    (event,) = layer.after_step(3, opt)
    assert "non-finite" in event["skipped"] and event["next_step"] == 5
    state = layer.state_dict()
    assert all(torch.equal(state[k], v) for k, v in kept.items() if k != "capturing")
    assert layer.grad_buffer is None and int(layer.merges) == 2


def test_the_fast_finder_keeps_the_exact_subspace():
    """svd: fast (randomized, then warm-started from the current P) on a (96, 64) layer at rank
    4: the share of G's energy its P keeps is within 1% of the exact SVD's, at two merges."""
    shares = {}
    for svd in ("exact", "fast"):
        layer, opt = make(96, 64, svd=svd, quantize_projection=False)  # captures 0, 2, 5
        done = 0
        for capture in (2, 5):
            train(layer, opt, done, capture)
            backward(layer, batch(64, 50), 50)
            grad = layer.grad_buffer.double().clone()
            opt.step()
            layer.after_step(capture + 1, opt)
            done = capture + 1
            p = layer.projection.double()  # (r, in): G's energy in its row space
            shares[svd, capture] = float((grad @ p.T).square().sum() / grad.square().sum())
    for capture in (2, 5):
        assert shares["fast", capture] >= 0.99 * shares["exact", capture], shares


@pytest.mark.parametrize("moments", ["reset", "keep"])
def test_moments_at_a_merge(moments):
    layer, opt = make(24, 16, moments_at_merge=moments)
    captured(layer, opt, 2)
    saved = {k: v.clone() for k, v in opt.param_state(layer.factor).items()}
    assert saved  # the factor trained on step index 1
    opt.step()
    layer.after_step(3, opt)
    state = opt.param_state(layer.factor)
    if moments == "reset":
        assert state == {}
    else:
        assert state.keys() == saved.keys() and all(torch.equal(state[k], saved[k]) for k in saved)


def test_the_run_dtype_reaches_the_factor_and_bias_only():
    """bf16 storage: the trained factor and the bias in bf16; codes, fp32 scales (of W and P)
    and the fp32 grad buffer as they are, through a merge."""
    layer, opt = make(24, 16, dtype=torch.bfloat16)
    x = batch(16, 1).detach().bfloat16().requires_grad_()
    layer(x).float().square().sum().backward()
    opt.step()
    layer.after_step(1, opt)
    assert layer.factor.dtype == layer.bias.dtype == torch.bfloat16
    assert layer.codes.dtype == layer.p_codes.dtype == torch.uint8
    assert layer.scales.dtype == layer.p_scales.dtype == torch.float32
    layer.set_capturing(True)
    assert layer.grad_buffer.dtype == torch.float32
    assert layer(x).dtype == torch.bfloat16 and layer.dense_weight().dtype == torch.bfloat16


@pytest.mark.parametrize(
    "fmt, quantize_projection, m, n",
    [("nf4", True, 24, 16), ("int4", True, 16, 24), ("nf4", False, 6, 130)],
)
def test_stored_bytes_are_the_formula(fmt, quantize_projection, m, n):
    """W: m n / 2 code bytes + 4 ceil(m n / 64) scale bytes; P (r x min) the same when quantized,
    else 4 r min; the factor 4 r max (fp32 here); the bias 4 m; three int64 schedule scalars.
    The grad buffer of a capture step is transient and not counted."""
    r = 4
    layer, _ = make(m, n, rank=r, format=fmt, quantize_projection=quantize_projection)
    assert layer.grad_buffer is not None  # step 0 captures
    quant = lambda numel: numel // 2 + 4 * -(-numel // GROUP)  # noqa: E731
    p = quant(r * min(m, n)) if quantize_projection else 4 * r * min(m, n)
    expected = quant(m * n) + p + 4 * r * max(m, n) + 4 * m + 3 * 8
    assert sum(layer.stored_bytes().values()) == expected


def test_forward_and_backward_compile_without_a_graph_break():
    """Both forms (capturing into the grad buffer, and not) under fullgraph aot_eager give the
    eager results: outputs, factor gradient and captured gradient."""
    eager, eager_opt = make(24, 16)
    compiled, compiled_opt = make(24, 16)
    fn = torch.compile(compiled, backend="aot_eager", fullgraph=True)
    for step in range(1, 4):  # step indices 0 and 2 capture, 1 does not
        x = batch(16, step)
        upstream = backward(eager, x, step)
        y = fn(x)
        (y * upstream).sum().backward()
        if compiled.grad_buffer is not None:
            torch.testing.assert_close(compiled.grad_buffer, eager.grad_buffer)
        else:
            torch.testing.assert_close(compiled.factor.grad, eager.factor.grad)
        for layer, opt in ((eager, eager_opt), (compiled, compiled_opt)):
            opt.step()
            opt.zero_grad(set_to_none=True)
            layer.after_step(step, opt)
        torch.testing.assert_close(compiled.dense_weight(), eager.dense_weight())


@pytest.mark.parametrize(
    "override, expected",
    [
        ("weights.rank=65", "weights.rank: 65 is above the smallest dimension"),
        ("weights.rank=0", "weights.rank: 0 must be >= 1"),
        ("weights.update_gap=0", "weights.update_gap: 0 must be >= 1"),
        ("weights.growth=-1", "weights.growth: -1.0 must be >= 0"),
        ("weights.group_size=63", "weights.group_size: 63 must be even and >= 2"),
        ("weights.format=fp4", "weights.format"),
        ("weights.moments_at_merge=rotate", "weights.moments_at_merge"),
    ],
)
def test_bad_options_are_one_line(tiny_run, capsys, override, expected):
    path = tiny_run("bad", {"weights": {"name": "loqt", "rank": 8}})
    assert cli(path, override) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and expected in err, err


def test_more_than_one_process_is_refused(tiny_run, capsys, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    path = tiny_run("ddp", {"weights": {"name": "loqt", "rank": 8}})
    assert cli(path) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "WORLD_SIZE=2" in err, err


def test_per_layer_steps_equal_the_whole_model_step(tiny_run):
    """optim.per_layer steps the factor inside backward (no hook fires on a capture step, where
    it has no gradient): 4 steps through the merges at step indices 0 and 2 end bitwise equal."""

    def run(per_layer: str) -> dict[str, torch.Tensor]:
        overrides = ["weights.name=loqt", "weights.rank=16", "weights.update_gap=2"]
        overrides += [f"optim.per_layer={per_layer}", "train.clip_grad_norm=0"]
        cfg, _ = load_run(tiny_run(), overrides)
        model = build_model(cfg, 512, torch.device("cpu"))
        opt = build_optimizer(cfg, model, torch.device("cpu"))
        layers = [m for m in model.modules() if isinstance(m, LoQTLinear)]
        for step in range(1, 5):
            ids = torch.randint(0, 512, (2, 16), generator=torch.Generator().manual_seed(step))
            logits = model(input_ids=ids).logits
            F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten()).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            for layer in layers:
                layer.after_step(step, opt)
        assert int(layers[0].merges) == 2
        return model.state_dict()

    whole, per_layer = run("false"), run("true")
    assert whole.keys() == per_layer.keys()
    assert all(torch.equal(whole[k], per_layer[k]) for k in whole)


def test_loqt_learns_on_real_text(tiny_run):
    """30 steps through the merges at step indices 0 and 15."""
    weights = {"name": "loqt", "rank": 16, "update_gap": 15, "compensation_iterations": 2}
    assert_short_run_learns(tiny_run, "loqt", {"weights": weights})


def test_loqt_resumes_bitwise_through_merges(tiny_run):
    """Captures at step indices 0 and 4: the checkpoint at step 4 is saved with the capture of
    index 4 pending (grad buffer allocated), so the resumed run must rebuild it and merge."""
    extra = {
        "weights": {"name": "loqt", "rank": 16, "update_gap": 4, "compensation_iterations": 2},
        "train": {"steps": 6},
        "checkpoint": {"every": 4},
    }
    straight, split = assert_resume_is_bitwise(tiny_run, extra, stop_at=4)
    merges = [
        [(e["step"], e["layer"], e["error"]) for e in metrics(d) if e.get("event") == "merge"]
        for d in (straight, split)
    ]
    assert merges[0] == merges[1] and sorted({s for s, _, _ in merges[0]}) == [1, 5]
    assert all(error > 0 for s, _, error in merges[0] if s == 5)  # a real re-quantization
    summary = json.loads((straight / "summary.json").read_text())
    assert summary["final_val_loss"] < math.log(512), summary


def test_a_compiled_run_takes_its_capture_steps_eagerly(tiny_run, monkeypatch):
    """With capture_eager, under train.compile a capture step (its forward feeds the grad
    buffer and detaches the factor) runs eagerly, so the run compiles one graph, not a second
    variant for a rare step; the result follows the eager run's. aot_eager stands in for
    inductor (fast on CPU)."""
    import functools

    from lowrank_train import trainer as trainer_module
    from lowrank_train.trainer import Trainer

    real_compile = torch.compile
    monkeypatch.setattr(
        trainer_module.torch,
        "compile",
        functools.partial(real_compile, backend="aot_eager"),
    )

    def run(compile_: bool) -> tuple[dict[str, torch.Tensor], int]:
        overrides = ["weights.name=loqt", "weights.rank=16", "weights.update_gap=2"]
        overrides += ["weights.capture_eager=true"]
        overrides += [f"train.compile={str(compile_).lower()}", "train.steps=4"]
        cfg, _ = load_run(tiny_run(f"c{compile_}"), overrides)
        torch._dynamo.reset()
        torch._dynamo.utils.counters.clear()
        trainer = Trainer(cfg)
        trainer.model.train()
        for _ in range(4):  # captures at step indices 0 and 2
            trainer.step(cfg.train.clip_grad_norm)
        layers = [m for m in trainer.model.modules() if isinstance(m, LoQTLinear)]
        assert int(layers[0].merges) == 2
        graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
        return trainer.model.state_dict(), graphs

    eager, _ = run(False)
    compiled, graphs = run(True)
    assert graphs == 1
    for key in eager:
        torch.testing.assert_close(compiled[key], eager[key], rtol=1e-4, atol=1e-5)
