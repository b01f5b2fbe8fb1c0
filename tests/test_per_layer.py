"""Per-layer updates: every method steps inside backward exactly as the whole-model step does
(weights, grad norm and state bitwise, accumulation included), gradients are freed as they are
consumed, hooks interleave with the layers' backward under per-layer compile, resume is
bitwise, it trains, and what it cannot do is refused in one line."""

from __future__ import annotations

import functools
import math

import pytest
import torch
from projector_cases import (
    assert_resume_is_bitwise,
    assert_short_run_learns,
    cli,
    metrics,
)

from lowrank_train import trainer as trainer_module
from lowrank_train.cli import main
from lowrank_train.errors import ConfigError
from lowrank_train.evaluation import causal_lm_loss
from lowrank_train.models import build_model
from lowrank_train.optim import build_optimizer
from lowrank_train.optim import per_layer as per_layer_module
from lowrank_train.optim.per_layer import PerLayerOptimizer, compile_layers
from lowrank_train.parameterizations import PARAMETERIZATIONS
from lowrank_train.parameterizations.base import storage_allocated
from lowrank_train.projectors import PROJECTORS
from lowrank_train.resolve import load_run
from lowrank_train.trainer import Trainer

CPU = torch.device("cpu")
LOW_RANK = {"rank": 8, "update_gap": 2}  # refreshes (or resamples) at steps 1 and 3


# Each parameterization's keys at the tiny model's size (rank 8 of 64); loqt merges at step 2.
WEIGHTS = {"dense": {}, "int8": {}, "loqt": {"rank": 8, "update_gap": 2}}
WEIGHTS |= {name: {"rank": 8} for name in ("lowrank", "sltrain", "lost")}


def method_cases() -> list[tuple[str, str, int, str]]:
    """(optim.name, projector, grad_accum, weights): both inner optimizers alone and every
    projector under adamw, accumulating 2 micro-batches; without accumulation, the two
    mechanisms (torch's step, ours) and INT8 (its side buffers released and re-acquired);
    every other parameterization under adamw, INT8 (writers) also under GaLore, Q-GaLore and
    APOLLO(-Mini)."""
    methods = [("adamw", "none"), ("adamw8bit", "none")]
    methods += [("adamw", name) for name in PROJECTORS.names() if name != "none"]
    others = [name for name in PARAMETERIZATIONS.names() if name != "dense"]
    return (
        [(o, p, 2, "dense") for o, p in methods]
        + [("adamw", "none", 1, "dense"), ("adamw", "galore", 1, "dense")]
        + [("adamw", "none", 1, "int8")]
        + [("adamw", "none", 2, name) for name in others]
        + [("adamw", p, 2, "int8") for p in ("galore", "qgalore")]
        # the 7B recipe's writers: a layer's steps as one batch, the whole model's as another
        + [("adamw", p, 1, "int8") for p in ("apollo", "apollo_mini")]
    )


def trainer(
    tiny_run,
    name: str,
    optim: dict,
    per_layer: bool,
    accum: int,
    weights: str = "dense",
    train: dict | None = None,
) -> Trainer:
    extra = {
        "optim": {**optim, "per_layer": per_layer},
        "train": {"clip_grad_norm": 0.0, "grad_accum": accum, **(train or {})},
        "weights": {"name": weights, **WEIGHTS[weights]},
    }
    cfg, _ = load_run(tiny_run(name, extra))
    return Trainer(cfg)


def optim_section(optimizer: str, projector: str) -> dict:
    proj = {"name": projector, **(LOW_RANK if projector != "apollo_mini" else {"update_gap": 2})}
    return {
        "name": optimizer,
        "weight_decay": 0.1,
        "projector": proj if projector != "none" else {},
    }


@pytest.mark.parametrize("optimizer, projector, accum, weights", method_cases())
def test_per_layer_equals_the_whole_model_step(tiny_run, optimizer, projector, accum, weights):
    """Three steps of the loop (through two refreshes) in both modes: the same weights, grad
    norms, optimizer state and events, bitwise (the hooks step each tensor with the math of
    the whole-model step; only the refresh timings differ)."""
    whole_events = assert_per_layer_equals_the_whole_model_step(
        tiny_run, optim_section(optimizer, projector), accum, weights
    )
    if projector in ("galore", "qgalore", "fira"):
        assert [e["step"] for e in whole_events if e["event"] == "refresh"] == [1, 3]


def assert_per_layer_equals_the_whole_model_step(
    tiny_run, optim: dict, accum: int, weights: str, per_layer_train: dict | None = None
) -> list[dict]:
    """Three steps in each mode (`per_layer_train`: more train keys of the per-layer run):
    weights, grad norms, optimizer state and untimed events bitwise equal; returns the events."""
    runs = {}
    for per_layer in (False, True):
        train = per_layer_train if per_layer else None
        name = f"{optim['name']}_{optim['projector'].get('name', 'none')}_{per_layer}"
        t = trainer(tiny_run, name, optim, per_layer, accum, weights, train)
        assert isinstance(t.optimizer, PerLayerOptimizer) == per_layer
        norms, events = [], []
        for _ in range(3):
            norms.append(t.step(math.inf)[1])
            events += t.optimizer.pop_events()
        runs[per_layer] = (t, norms, events)
    (whole, whole_norms, whole_events), (layered, layered_norms, layered_events) = (
        runs[False],
        runs[True],
    )
    for (name, a), b in zip(
        whole.model.state_dict().items(), layered.model.state_dict().values(), strict=True
    ):
        assert torch.equal(a, b), name
    assert all(torch.equal(a, b) for a, b in zip(whole_norms, layered_norms, strict=True))
    assert_states_equal(whole.optimizer.state_dict(), layered.optimizer.state_dict())
    assert untimed(layered_events) == untimed(whole_events)
    return whole_events


def untimed(events: list[dict]) -> list[dict]:
    return [{k: v for k, v in e.items() if k != "seconds"} for e in events]


def assert_states_equal(a, b, where: str = "state") -> None:
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            assert_states_equal(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, list | tuple):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_states_equal(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


def tiny_per_layer(tiny_run, *overrides: str):
    cfg, _ = load_run(tiny_run(), ["optim.per_layer=true", "train.clip_grad_norm=0", *overrides])
    model = build_model(cfg, 512, CPU)
    return model, build_optimizer(cfg, model, CPU)


def batch(seed: int) -> torch.Tensor:
    return torch.randint(0, 512, (2, 17), generator=torch.Generator().manual_seed(seed))


def backward(model, seed: int, accum: int = 1) -> None:
    x = batch(seed)
    (causal_lm_loss(model, x[:, :-1], x[:, 1:]) / accum).backward()


def live_gradients_at_each_hook(model) -> list[int]:
    """A list that gets, at each tensor's post-accumulate hook (after the wrapper's), the
    number of the model's tensors holding a gradient."""
    params, live = list(model.parameters()), []
    for p in params:  # registered after the wrapper's hook, so it runs after it
        p.register_post_accumulate_grad_hook(
            lambda _: live.append(sum(q.grad is not None for q in params))
        )
    return live


def test_each_gradient_is_freed_as_soon_as_it_is_consumed(tiny_run):
    """grad_accum 1: no other gradient exists when a tensor's completes. grad_accum 2: the first
    backward keeps every full gradient (the documented cost of accumulating); in the last one
    each is stepped and freed in its own hook."""
    model, _ = tiny_per_layer(tiny_run)
    live = live_gradients_at_each_hook(model)
    backward(model, 0)
    assert live == [0] * len(list(model.parameters()))

    model, opt = tiny_per_layer(tiny_run, "train.grad_accum=2")
    params, live = list(model.parameters()), live_gradients_at_each_hook(model)
    before = [p.detach().clone() for p in params]
    backward(model, 0, accum=2)
    assert live[-1] == len(params) and all(p.grad is not None for p in params)
    assert all(torch.equal(p, b) for p, b in zip(params, before, strict=True))  # not stepped yet
    live.clear()
    backward(model, 1, accum=2)
    assert live == list(range(len(params) - 1, -1, -1))
    assert all(not torch.equal(p, b) for p, b in zip(params, before, strict=True))
    norm = opt.clip_grad_norm_(math.inf)
    assert torch.isfinite(norm) and norm > 0
    opt.step()
    with pytest.raises(ValueError, match="set train.clip_grad_norm=0"):
        opt.clip_grad_norm_(1.0)


def test_hooks_interleave_with_the_backward_of_separately_compiled_layers(tiny_run):
    """compile_layers (aot_eager on the CPU): each layer's tensors step before the backward of
    the layer below begins, so the gradients of the whole model never exist together."""
    model, _ = tiny_per_layer(tiny_run)
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    compile_layers(model, backend="aot_eager")
    order: list[tuple[str, int]] = []
    layers = list(model.model.layers)
    owner = {id(p): i for i, layer in enumerate(layers) for p in layer.parameters()}
    for p in model.parameters():  # after the wrapper's hook: stepped and freed by then
        if id(p) in owner:
            p.register_post_accumulate_grad_hook(
                lambda q: order.append(("stepped" if q.grad is None else "held", owner[id(q)]))
            )

    probes = on_backward_start(layers, lambda index: order.append(("backward", index)))
    backward(model, 0)
    for probe in probes:
        probe.remove()
    per_layer = {i: len(list(layer.parameters())) for i, layer in enumerate(layers)}
    expected = []
    for i in reversed(range(len(layers))):
        expected += [("backward", i)] + [("stepped", i)] * per_layer[i]
    assert order == expected
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 1  # the layers ran compiled


def on_backward_start(layers, record) -> list:
    """Forward hooks (returned, to remove) that call record(index) as the backward of each
    decoder layer starts: a hook on the gradient of the layer's output."""

    def mark(module, args, output):
        hidden = output[0] if isinstance(output, tuple) else output
        index = layers.index(module)
        hidden.register_hook(lambda g: record(index))

    return [layer.register_forward_hook(mark) for layer in layers]


def test_resume_is_bitwise_in_per_layer_mode_with_accumulation(tiny_run):
    """GaLore per layer at grad_accum 2, stopped at step 4 and resumed: refreshes at 6 and 11
    after the resume; same losses, refreshes and weights as the straight run."""
    extra = {
        "optim": {"per_layer": True, "projector": {"name": "galore", "rank": 8, "update_gap": 5}},
        "train": {"clip_grad_norm": 0.0, "grad_accum": 2},
        "checkpoint": {"every": 4},
    }
    assert_resume_is_bitwise(tiny_run, extra, stop_at=4, refreshes=[1, 6, 11])


def test_per_layer_trains_and_logs_the_true_grad_norm(tiny_run):
    extra = {
        "optim": {"per_layer": True, "projector": {"name": "galore", "rank": 8, "update_gap": 10}},
        "train": {
            "steps": 30,
            "batch_size": 8,
            "warmup_steps": 5,
            "lr": 1e-2,
            "clip_grad_norm": 0.0,
        },
    }
    assert_short_run_learns(tiny_run, "per_layer_learns", extra)
    lines = metrics(tiny_run("per_layer_learns").parent / "runs" / "per_layer_learns")
    norms = [m["grad_norm"] for m in lines if "grad_norm" in m]
    assert len(norms) == 3 and all(math.isfinite(n) and n > 0 for n in norms)


def test_clipping_with_per_layer_is_refused_in_one_line(tiny_run, capsys):
    path = tiny_run("clipped", {"optim": {"per_layer": True}})
    assert cli(path) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert "train.clip_grad_norm: 1.0 with optim.per_layer=true" in err
    assert err.endswith("set train.clip_grad_norm=0")


def test_world_size_above_one_is_refused_in_one_line(tiny_run):
    """A real process group of world size 2 (torch's fake backend: one process stands for the
    rank 0 of two)."""
    from torch.testing._internal.distributed.fake_pg import FakeStore

    cfg, _ = load_run(tiny_run(), ["optim.per_layer=true", "train.clip_grad_norm=0"])
    model = build_model(cfg, 512, CPU)
    torch.distributed.init_process_group("fake", store=FakeStore(), rank=0, world_size=2)
    try:
        with pytest.raises(ConfigError, match=r"^optim.per_layer: true with world size 2: ") as e:
            build_optimizer(cfg, model, CPU)
    finally:
        torch.distributed.destroy_process_group()
    assert len(str(e.value).splitlines()) == 1


def test_torchruns_world_size_is_refused_before_the_group_starts(tiny_run, capsys, monkeypatch):
    """`estimate` (and any check before `distributed.setup`) sees torchrun's WORLD_SIZE, as the
    int8 and loqt checks do."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    path = tiny_run()
    assert main(["estimate", str(path), "optim.per_layer=true", "train.clip_grad_norm=0"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "optim.per_layer: true with world size 2" in err, err


def test_int8_writers_step_from_their_layers_input_norm_hook(tiny_run):
    """A decoder layer's INT8 codes change when its input norm's gradient completes: layer 1's
    while layer 0's backward has not run, layer 0's in its own norm's hook."""
    model, _ = tiny_per_layer(tiny_run, "weights.name=int8")
    layers = list(model.model.layers)
    codes = [[m.codes for m in layer.modules() if hasattr(m, "codes")] for layer in layers]
    assert all(len(c) == 7 for c in codes)
    before = [[c.clone() for c in layer] for layer in codes]
    changed = lambda i: [not torch.equal(c, b) for c, b in zip(codes[i], before[i], strict=True)]  # noqa: E731
    seen = {}

    def record(i: int):
        def hook(_) -> None:
            seen[i] = (changed(0), changed(1))

        return hook

    for i, layer in enumerate(layers):  # after the wrapper's hook on the same tensor
        layer.input_layernorm.weight.register_post_accumulate_grad_hook(record(i))
    backward(model, 0)
    assert seen[1] == ([False] * 7, [True] * 7)
    assert seen[0] == ([True] * 7, [True] * 7)


def test_a_step_that_fails_midway_is_never_saved(tiny_run, monkeypatch):
    """An out-of-memory error raised from a hook in step 3 (some tensors stepped, others not):
    the run stops with it, the checkpoints are those of steps 1 and 2, and the wrapper refuses
    to give its state to any later save."""
    calls, real = {"n": 0}, per_layer_module.step_subset
    tensors = 2 * 9 + 3  # 2 layers x (7 Linears + 2 norms) + embeddings, final norm, lm_head

    def failing(optimizer, picked):
        calls["n"] += 1
        if calls["n"] == 2 * tensors + 10:
            raise torch.OutOfMemoryError("injected: CUDA out of memory")
        real(optimizer, picked)

    monkeypatch.setattr(per_layer_module, "step_subset", failing)
    extra = {
        "optim": {"per_layer": True},
        "train": {"clip_grad_norm": 0.0, "steps": 5},
        "checkpoint": {"every": 1, "keep_last": 5},
    }
    cfg, _ = load_run(tiny_run("fails", extra))
    t = Trainer(cfg)
    # torch's error, or the loop's one-line report of it (exit code 4): either way, it stops
    with pytest.raises(Exception, match="out of memory"):
        t.run()
    assert t.progress.step == 2
    assert sorted(p.name for p in cfg.checkpoint_dir.glob("step-*")) == [
        "step-00000001",
        "step-00000002",
    ]
    with pytest.raises(RuntimeError, match="some tensors were stepped and others not"):
        t.save(torch.zeros(()))
    with pytest.raises(RuntimeError, match="resume from the last checkpoint"):
        t.optimizer.step()


def side_buffers(model) -> list[list[torch.Tensor]]:
    """Each decoder layer's INT8 weight-gradient side buffers."""
    return [[m.weight_grad for m in layer.modules() if hasattr(m, "weight_grad")]
            for layer in model.model.layers]  # fmt: skip


def resident_layers(buffers: list[list[torch.Tensor]]) -> list[int]:
    """The layers whose side buffers have their memory (all of a layer's, or none of them)."""
    held = [[storage_allocated(b) for b in layer] for layer in buffers]
    assert all(len(set(h)) == 1 for h in held), held
    return [i for i, h in enumerate(held) if h[0]]


def test_int8_side_buffers_hold_memory_only_around_their_layers_backward(tiny_run):
    """4 layers at grad_accum 1, two steps: recorded at every hook and as each layer's backward
    starts, at most 3 layers' buffers are allocated, the layer in backward always among them
    (zeroed), and after the step only the top layer's; at grad_accum 2 all stay allocated."""
    model, opt = tiny_per_layer(tiny_run, "weights.name=int8", "model.num_layers=4")
    buffers, layers = side_buffers(model), list(model.model.layers)
    assert resident_layers(buffers) == [3]  # released from the start, as after any step
    at_hooks, at_backward = [], []
    for p in model.parameters():  # after the wrapper's hook: acquired or released by then
        p.register_post_accumulate_grad_hook(lambda _: at_hooks.append(resident_layers(buffers)))

    on_backward_start(
        layers,
        lambda i: at_backward.append(
            (i, resident_layers(buffers), all(not b.any() for b in buffers[i]))
        ),
    )
    for step in range(2):
        at_hooks.clear(), at_backward.clear()
        backward(model, step)
        opt.step()
        opt.zero_grad()
        assert max(len(r) for r in at_hooks) == 3 and [1, 2, 3] in at_hooks
        assert at_backward == [
            (3, [3], True), (2, [2, 3], True), (1, [1, 3], True), (0, [0, 3], True)
        ]  # fmt: skip
        assert resident_layers(buffers) == [3]

    model, opt = tiny_per_layer(
        tiny_run, "weights.name=int8", "model.num_layers=4", "train.grad_accum=2"
    )
    for seed in range(2):
        backward(model, seed, accum=2)
        assert resident_layers(side_buffers(model)) == [0, 1, 2, 3]


def test_a_released_side_buffer_is_never_read_or_written(tiny_run):
    """Layer 0's buffers are released after a step: stepping them without a backward, or a
    backward that skips their re-acquiring, raises a one-line RuntimeError (never touches the
    freed memory; the op checks outside the traced graph)."""
    model, opt = tiny_per_layer(tiny_run, "weights.name=int8")
    with pytest.raises(RuntimeError, match=r"side buffer of model\.layers\.0\.self_attn\.q_proj"):
        opt.step()
    model, opt = tiny_per_layer(tiny_run, "weights.name=int8")
    opt.acquire_at.clear()  # a wrapper whose triggers never fire
    with pytest.raises(RuntimeError, match=r"side buffer of a quantized layer is released"):
        backward(model, 0)


def test_per_layer_int8_with_compiled_layers_equals_the_whole_model_step(tiny_run, monkeypatch):
    """train.compile with per_layer compiles each decoder layer (aot_eager on the CPU): the
    released and re-acquired side buffers are the objects the graphs hold, bitwise the same
    three steps as the eager whole-model run."""
    monkeypatch.setattr(
        trainer_module, "compile_layers", functools.partial(compile_layers, backend="aot_eager")
    )
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    assert_per_layer_equals_the_whole_model_step(
        tiny_run, optim_section("adamw", "none"), 1, "int8", {"compile": True}
    )
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 1


# -- optim.per_layer_accumulation: projected ------------------------------------------------


@pytest.mark.parametrize("name", ["galore", "qgalore"])
def test_projected_accumulation_is_the_summed_step_and_refreshes_from_the_first_micro_batch(name):
    """Two micro-batches folded in the projected space (accumulate_ of G_1, then a step on G_2)
    against the step on G_1 + G_2: equal to fp32 rounding between refreshes (down is linear);
    at a refresh the basis is the one G_1 alone gives (the named deviation)."""
    import copy

    from lowrank_train.optim.projected import ProjectedOptimizer

    cls = PROJECTORS.get(name)
    gen = torch.Generator().manual_seed(0)
    grads = [torch.randn(24, 40, generator=gen) for _ in range(6)]

    def build():
        p = torch.nn.Parameter(torch.randn(24, 40, generator=torch.Generator().manual_seed(1)))
        opt = ProjectedOptimizer(
            [{"params": [p], "param_names": ["w"]}],
            cls(cls.Config(rank=4, update_gap=3)),
            lr=1e-2,
            weight_decay=0.1,
        )
        return p, opt

    summed, projected = build(), build()
    for step in (1, 2):  # step 1 refreshes (T = 3: steps 1, 4); step 2 does not
        g1, g2 = grads[2 * step - 2], grads[2 * step - 1]
        p, opt = summed
        p.grad = g1 + g2
        opt.step()
        p, opt = projected
        opt.accumulate_(p, "w", g1)
        if step == 1:  # the basis came from G_1 alone, before G_2 existed
            first = copy.deepcopy(opt.state[p])
            reference = copy.deepcopy(summed[1].state[summed[0]])
            assert "low_accum" in first and first["refreshes"] == 1
        p.grad = g2
        opt.step()
        if step == 1:
            # the summed run's basis is G_1 + G_2's: the two runs now hold different bases
            assert not torch.equal(
                dequantized_or_basis(cls, first), dequantized_or_basis(cls, reference)
            )
            summed[1].state[summed[0]].update(copy.deepcopy(opt.state[p]))  # same basis again
            summed[0].data.copy_(p.data)
    assert "low_accum" not in projected[1].state[projected[0]]
    torch.testing.assert_close(projected[0].data, summed[0].data, rtol=1e-5, atol=1e-6)


def dequantized_or_basis(cls, state) -> torch.Tensor:
    """The basis in state: GaLore's tensor, Q-GaLore's INT4 codes."""
    return state["basis"] if "basis" in state else state["basis_codes"].float()


def test_projected_accumulation_frees_each_micro_batchs_gradient_and_trains(tiny_run):
    """Per-layer GaLore at grad_accum 2 with projected accumulation through the loop: in the
    first micro-batch no projected tensor keeps its gradient past its hook, the loss falls, and
    the grad norm is logged as nan (the summed full gradient is never formed)."""
    model, opt = tiny_per_layer(
        tiny_run,
        "optim.projector.name=galore",
        "optim.projector.rank=8",
        "train.grad_accum=2",
        "optim.per_layer_accumulation=projected",
    )
    projected = [opt.params[i] for i in opt.projected]
    assert projected and all(p.ndim == 2 for p in projected)
    kept = []
    for p in projected:
        p.register_post_accumulate_grad_hook(lambda q: kept.append(q.grad is not None))
    backward(model, 0, accum=2)
    assert kept and not any(kept)
    backward(model, 1, accum=2)
    assert math.isnan(opt.clip_grad_norm_(math.inf).item())  # as the loop asks, before step()
    opt.step()
    opt.zero_grad()

    run = assert_short_run_learns(
        tiny_run,
        "galore_projected_accum",
        {
            "optim": {
                "per_layer": True,
                "per_layer_accumulation": "projected",
                "projector": {"name": "galore", "rank": 8, "update_gap": 10},
            },
            "train": {
                "steps": 30,
                "batch_size": 4,
                "grad_accum": 2,
                "warmup_steps": 5,
                "lr": 1e-2,
                "clip_grad_norm": 0.0,
            },
        },
    )
    assert run["step"] == 30


def test_projected_accumulation_is_refused_where_it_cannot_be_exact(tiny_run, capsys):
    """APOLLO reads the full gradient (its channel scales): one line, exit 2; and the key means
    nothing without per_layer."""
    path = tiny_run(
        "refused",
        {
            "optim": {
                "per_layer": True,
                "per_layer_accumulation": "projected",
                "projector": {"name": "apollo", "rank": 8},
            },
            "train": {"clip_grad_norm": 0.0, "grad_accum": 2},
        },
    )
    assert cli(path) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "optim.per_layer_accumulation" in err[0] and "apollo" in err[0]
    with pytest.raises(ConfigError, match="optim.per_layer_accumulation"):
        load_run(tiny_run("bare"), ["optim.per_layer_accumulation=projected"])
