"""`int8` weights: codes and fp32 scales against a float64 quantizer, stored bytes against
mn + 4 ceil(mn / 256), the writer's update W <- SR(deq(W) - lr (u + wd deq(W))) against a float64
re-implementation (bounds and expectation), stochastic rounding unbiased and reproducible by
seed, the optimizer routing (own Adam whatever optim.name, side buffers clipped and zeroed,
ownership), a compiled forward and backward without a graph break, training that follows
dense training, bitwise resume and one-line refusals."""

from __future__ import annotations

import json
import math

import pytest
import torch
from projector_cases import assert_resume_is_bitwise, cli, train_losses

from lowrank_train.models import build_model
from lowrank_train.optim import build_optimizer, check_ownership
from lowrank_train.optim.multi import MultiOptimizer
from lowrank_train.parameterizations.base import storage_allocated
from lowrank_train.parameterizations.int8 import Int8, Int8Linear
from lowrank_train.resolve import load_run

CPU = torch.device("cpu")


def layer(m: int, n: int, seed: int = 0, dtype=torch.float32, std: float = 0.02) -> Int8Linear:
    linear = torch.nn.Linear(n, m, bias=False)
    with torch.no_grad():
        linear.weight.normal_(0.0, std, generator=torch.Generator().manual_seed(seed))
    return Int8().convert(linear, "layer", torch.Generator().manual_seed(seed), dtype)


def float64_quantize(w: torch.Tensor, g: int = 256):
    """Symmetric absmax per group of the flattened W, round half away from zero, in float64."""
    flat = w.double().reshape(-1)
    pad = -flat.numel() % g
    blocks = torch.cat([flat, flat.new_zeros(pad)]).view(-1, g)
    scales = blocks.abs().amax(1) / 127
    q = blocks / scales[:, None]
    q = torch.sign(q) * torch.floor(q.abs() + 0.5)
    return q.reshape(-1)[: flat.numel()].reshape(w.shape), scales


def test_codes_and_scales_match_the_float64_quantizer_and_bytes_the_formula():
    m, n = 5, 123  # 615 elements: 3 groups, the last partial and spanning rows
    lin = layer(m, n)
    w = torch.nn.Linear(n, m, bias=False).weight.detach()
    torch.nn.init.normal_(w, 0.0, 0.02, generator=torch.Generator().manual_seed(0))
    q, scales = float64_quantize(w)
    assert lin.codes.dtype == torch.int8 and torch.equal(lin.codes.double(), q)
    assert lin.scales.dtype == torch.float32
    torch.testing.assert_close(lin.scales.double(), scales, rtol=2**-23, atol=0)
    assert lin.stored_bytes() == {"codes": m * n, "scales": 4 * math.ceil(m * n / 256)}
    # the side buffer is a gradient: not stored, saved, or a parameter
    assert "weight_grad" not in lin.state_dict() and not list(lin.parameters())


def test_stored_bytes_of_the_tiny_model_equal_mn_plus_4mn_over_256(tiny_run):
    cfg, _ = load_run(tiny_run(), ["weights.name=int8"])
    model = build_model(cfg, 512, torch.device("meta"))  # the meta build works, too
    layers = [m for m in model.modules() if isinstance(m, Int8Linear)]
    assert len(layers) == 14
    for lin in layers:
        mn = lin.out_features * lin.in_features
        assert mn % 256 == 0 and sum(lin.stored_bytes().values()) == mn + 4 * mn // 256
        assert lin.codes.device.type == "meta" and lin.codes.dtype == torch.int8


def test_the_run_dtype_reaches_the_gradient_buffer_and_scales_stay_fp32(tiny_run):
    """convert applies the storage dtype where the method means it; swap_linears only moves."""
    cfg, _ = load_run(tiny_run(), ["weights.name=int8", "model.dtype=bfloat16"])
    lin = next(m for m in build_model(cfg, 512, CPU).modules() if isinstance(m, Int8Linear))
    assert lin.scales.dtype == torch.float32 and lin.codes.dtype == torch.int8
    assert lin.weight_grad.dtype == torch.bfloat16


def reference_target(lin: Int8Linear, update, lr, wd) -> torch.Tensor:
    """deq(W) - lr (u + wd deq(W)) in float64, and the float64 scales of its groups."""
    w = (lin.codes.double().reshape(-1, 256) * lin.scales.double()[:, None]).reshape(
        lin.codes.shape
    )
    return w - lr * (update.double() + wd * w)


def test_the_writer_rounds_the_float64_update_stochastically_and_without_bias():
    """One write of 102,400 elements: every new code is the floor or the ceiling of
    target / s' (s' = the target group's absmax / 127), and the mean rounding error over all of
    them lies within 4 standard errors of 0 (SE from each element's Bernoulli variance)."""
    lin = layer(400, 256, seed=1)
    gen = torch.Generator().manual_seed(2)
    update = torch.randn(400, 256, generator=gen)
    lr, wd = 1e-4, 0.1  # a move of ~0.1 code: rounding to nearest would undo most of it
    target = reference_target(lin, update, lr, wd)
    lin.writers()["weight"].write(update, lr, wd, step=7)
    s_new = target.reshape(-1, 256).abs().amax(1) / 127
    torch.testing.assert_close(lin.scales.double(), s_new, rtol=1e-6, atol=0)
    u = (target.reshape(-1, 256) / s_new[:, None]).reshape(-1)
    c = lin.codes.double().reshape(-1)
    assert ((c - torch.floor(u)).abs() < 1e-6).logical_or((c - torch.ceil(u)).abs() < 1e-6).all()
    p = u - torch.floor(u)
    error = c - u  # E = 0 for an unbiased rounding; Var = p (1 - p)
    se = (p * (1 - p)).sum().sqrt() / u.numel()
    assert error.mean().abs() < 4 * se, (error.mean().item(), se.item())
    # without SR the small move would mostly vanish: its fraction of a code is what SR keeps
    assert (c != torch.round(u)).float().mean() > 0.05


def test_a_tiny_update_survives_in_expectation_and_rounding_is_reproducible_by_seed():
    """An update of a tenth of a code per step, 200 steps: the mean weight moves by the sum of
    the updates (within 4 SE), where rounding to nearest would leave it unchanged; the same
    seed and step give the same codes, another step other codes."""
    a, b = layer(8, 256, seed=3), layer(8, 256, seed=3)
    step_size = 0.1 * a.scales.mean().item()
    start = a.dense_weight().double().mean()
    wa, wb = a.writers()["weight"], b.writers()["weight"]
    steps = 200
    for t in range(1, steps + 1):
        wa.write(torch.full((8, 256), -step_size), 1.0, 0.0, t)
        wb.write(torch.full((8, 256), -step_size), 1.0, 0.0, t)
        assert torch.equal(a.codes, b.codes) and torch.equal(a.scales, b.scales)
    moved = a.dense_weight().double().mean() - start
    # each write's error per element has sd <= s/2; averaged over 2048 elements and summed
    # over 200 independent writes
    se = 0.5 * a.scales.double().mean() * math.sqrt(steps / 2048)
    assert abs(moved - steps * step_size) < 4 * se, (moved, steps * step_size, se)
    before = a.codes.clone()
    wa.write(torch.zeros(8, 256), 0.0, 0.0, 1000)
    wb.write(torch.zeros(8, 256), 0.0, 0.0, 1001)
    assert torch.equal(a.codes, before)  # a zero update keeps the grid: exact codes stay put
    c = layer(8, 256, seed=3)
    c.writers()["weight"].write(torch.full((8, 256), -step_size), 1.0, 0.0, 1)
    d = layer(8, 256, seed=3)
    d.writers()["weight"].write(torch.full((8, 256), -step_size), 1.0, 0.0, 2)
    assert not torch.equal(c.codes, d.codes)


def tiny(tiny_run, *overrides):
    cfg, _ = load_run(tiny_run(), ["weights.name=int8", *overrides])
    model = build_model(cfg, 512, CPU)
    return model, build_optimizer(cfg, model, CPU)


def backward(model, seed: int = 0) -> None:
    x = torch.randint(0, 512, (2, 16), generator=torch.Generator().manual_seed(seed))
    logits = model(input_ids=x).logits
    torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), x[:, 1:].flatten()).backward()


def allocated_side_buffers(model) -> list[bool]:
    return [storage_allocated(m.weight_grad) for m in model.modules() if isinstance(m, Int8Linear)]


def test_side_buffers_are_born_without_memory_and_held_by_whoever_steps_them(tiny_run):
    """A build holds no side buffer (at 7B in bf16 all of them are 13 GB: a build that made
    them would peak there); the whole-model optimizer acquires every one, the per-layer one
    only the top layer's. Moving or casting a module with released buffers is safe and keeps
    them released."""
    cfg, _ = load_run(tiny_run(), ["weights.name=int8"])
    model = build_model(cfg, 512, CPU)
    assert not any(allocated_side_buffers(model))
    model.double()  # torch would read past an empty storage: _apply re-creates it released
    lin = next(m for m in model.modules() if isinstance(m, Int8Linear))
    assert lin.weight_grad.dtype == torch.float64 and not storage_allocated(lin.weight_grad)
    model.float()
    build_optimizer(cfg, model, CPU)
    assert all(allocated_side_buffers(model))

    per_layer = ["optim.per_layer=true", "train.clip_grad_norm=0"]
    model, _ = tiny(tiny_run, *per_layer)
    top = [storage_allocated(m.weight_grad) for m in model.model.layers[-1].modules()
           if isinstance(m, Int8Linear)]  # fmt: skip
    assert all(top) and sum(allocated_side_buffers(model)) == len(top)


@pytest.mark.parametrize(
    "overrides, owner",
    [
        (["optim.name=adamw8bit"], "full_adam"),
        (["optim.state_dtype=int8"], "full_adam"),
        (["optim.projector.name=galore", "optim.projector.rank=8"], "galore"),
        (
            ["optim.projector.name=qgalore", "optim.projector.rank=8", "optim.state_dtype=int8"],
            "qgalore",
        ),
    ],
)
def test_writer_tensors_go_to_our_own_adam_whatever_optim_name(tiny_run, overrides, owner):
    model, opt = tiny(tiny_run, *overrides)
    lin = next(m for m in model.modules() if isinstance(m, Int8Linear))
    assert opt.owner(lin.codes) is opt.optimizers[owner]
    check_ownership(model, opt)
    before = lin.codes.clone()
    backward(model)
    opt.step()
    assert not torch.equal(lin.codes, before)
    if "optim.state_dtype=int8" in overrides:
        assert opt.param_state(lin.codes)["exp_avg"].dtype == torch.uint8


def test_clipping_includes_side_buffers_and_zero_grad_clears_them(tiny_run):
    model, opt = tiny(tiny_run)
    backward(model)
    lin = next(m for m in model.modules() if isinstance(m, Int8Linear))
    lin.weight_grad.fill_(1e3)  # a huge gradient only a side buffer holds
    huge = 1e3 * math.sqrt(lin.weight_grad.numel())
    norm = opt.clip_grad_norm_(1.0)
    assert norm >= huge
    after = torch.nn.utils.get_total_norm(opt.gradients())
    assert after <= 1.0 + 1e-4 and lin.weight_grad.abs().max() < 1e3 / huge * 1.01
    opt.zero_grad(set_to_none=True)
    assert all(not m.weight_grad.any() for m in model.modules() if isinstance(m, Int8Linear))


def test_ownership_counts_writer_tensors(tiny_run):
    model, opt = tiny(tiny_run)
    check_ownership(model, opt)
    without = MultiOptimizer({"adamw": opt.optimizers["adamw"]})
    with pytest.raises(RuntimeError, match=r"not owned \['model.layers.0.self_attn.q_proj.codes"):
        check_ownership(model, without)


def test_step_tensors_steps_only_the_given_ones(tiny_run):
    model, opt = tiny(tiny_run)
    layers = [m for m in model.modules() if isinstance(m, Int8Linear)]
    before = [m.codes.clone() for m in layers]
    backward(model)
    opt.optimizers["full_adam"].step_tensors([layers[0].codes])
    assert not torch.equal(layers[0].codes, before[0])
    assert all(torch.equal(m.codes, b) for m, b in zip(layers[1:], before[1:], strict=True))


def test_the_model_compiles_forward_and_backward_without_a_graph_break(tiny_run):
    model, _ = tiny(tiny_run)
    x = torch.randint(0, 512, (2, 16), generator=torch.Generator().manual_seed(0))
    lin = model.model.layers[0].self_attn.q_proj

    def loss(ids):
        return model(input_ids=ids).logits.float().square().mean()

    loss(x).backward()
    eager = lin.weight_grad.clone()
    lin.weight_grad.zero_()
    torch._dynamo.reset()
    compiled = torch.compile(loss, backend="aot_eager", fullgraph=True)  # raises at a break
    compiled(x).backward()
    torch.testing.assert_close(lin.weight_grad, eager, rtol=1e-4, atol=1e-7)


def test_int8_training_follows_dense_training(tiny_run):
    """30 steps at lr 1e-2 on real text from the same dense init: the int8 run's losses stay
    within 0.1 nats of the dense (fp32) run's at every logged step, and both fall more than 0.6
    nats below ln(512), where an untrained model sits. Why 0.1: each INT8 weight is off its fp32
    value by at most half a code (1/254 of its group's absmax) and SR keeps every update unbiased,
    so the runs differ by noise, not drift; measured 2026-12-01, the gap stayed below 0.01 nats
    over 100 steps."""
    runs = {}
    for name in ("dense", "int8"):
        path = tiny_run(
            name,
            {
                "weights": {"name": name},
                "train": {"steps": 30, "batch_size": 8, "warmup_steps": 5, "lr": 1e-2},
                "logging": {"every": 5},
            },
        )
        assert cli(path) == 0
        runs[name] = train_losses(path.parent / "runs" / name)
    dense, int8 = runs["dense"], runs["int8"]
    gaps = {s: abs(int8[s] - dense[s]) for s in dense}
    assert max(gaps.values()) < 0.1, gaps
    assert max(gaps.values()) > 0, "identical losses: the int8 run did not quantize"
    assert max(int8[30], dense[30]) < math.log(512) - 0.6, (dense, int8)


def test_int8_trains_and_resumes_bitwise(tiny_run):
    extra = {"weights": {"name": "int8"}, "train": {"steps": 8}, "checkpoint": {"every": 4}}
    straight, _ = assert_resume_is_bitwise(tiny_run, extra, stop_at=4)
    summary = json.loads((straight / "summary.json").read_text())
    assert summary["final_val_loss"] < math.log(512), summary


@pytest.mark.parametrize(
    "override, expected",
    [
        ("weights.group_size=3", "weights.group_size: 3 must be an even integer"),
        ("weights.rank=3", "weights.rank"),
    ],
)
def test_bad_options_are_one_line(tiny_run, capsys, override, expected):
    path = tiny_run("bad", {"weights": {"name": "int8"}})
    assert cli(path, override) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and expected in err, err


def test_more_than_one_process_is_refused_in_one_line(tiny_run, capsys, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert cli(tiny_run("ddp", {"weights": {"name": "int8"}})) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "weights.name: int8 runs in one process only" in err


def test_the_dequantize_matmul_trains_like_the_fused_one(tiny_run):
    """weights.matmul only changes how y = x deq(W)^T is multiplied: 10 fp32 steps of each
    from the same init give losses within 1e-4 (on the CPU both multiply the same deq(W);
    the sums run in another order)."""
    runs = {}
    for matmul in ("fused", "dequantize"):
        path = tiny_run(
            matmul,
            {"weights": {"name": "int8", "matmul": matmul}, "train": {"steps": 10}},
        )
        assert cli(path) == 0
        runs[matmul] = train_losses(path.parent / "runs" / matmul)
    gaps = [abs(runs["fused"][s] - runs["dequantize"][s]) for s in runs["fused"]]
    assert len(gaps) == 10 and max(gaps) < 1e-4, runs
