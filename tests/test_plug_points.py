"""Plug points: every combination that validate accepts trains through the builders with every
tensor owned once and moving, one of each mechanism resumes bitwise through a checkpoint,
`methods` lists the registries and the accepted matrix, and export gives a plain HF model
with the same logits. The matrix comes from the registries, so a new method joins by itself."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

from lowrank_train.checkpoint import load_checkpoint, save_checkpoint
from lowrank_train.cli import main
from lowrank_train.config import dump_yaml
from lowrank_train.errors import ConfigError
from lowrank_train.export import checkpoint_of
from lowrank_train.models import build_model
from lowrank_train.optim import build_optimizer, check_ownership
from lowrank_train.optim.base import OPTIMIZERS
from lowrank_train.optim.multi import MultiOptimizer
from lowrank_train.parameterizations import PARAMETERIZATIONS, ParameterizedLinear
from lowrank_train.projectors import PROJECTORS
from lowrank_train.projectors.base import Projector
from lowrank_train.registry import Registry, UnknownName
from lowrank_train.resolve import combinations, load_run, supported_combinations

CPU = torch.device("cpu")


def tiny_model_and_optimizer(tiny_run, *overrides: str):
    cfg, _ = load_run(tiny_run(), list(overrides))
    model = build_model(cfg, 512, CPU)
    return cfg, model, build_optimizer(cfg, model, CPU)


def batch(step: int) -> torch.Tensor:
    return torch.randint(0, 512, (2, 16), generator=torch.Generator().manual_seed(step))


def train_steps(model, optimizer, first: int, last: int) -> list[dict]:
    """Steps first+1..last as the loop takes them (step, then every layer's after_step);
    returns the events of the optimizer and the layers."""
    layers = [m for m in model.modules() if isinstance(m, ParameterizedLinear)]
    events: list[dict] = []
    for step in range(first + 1, last + 1):
        x = batch(step)
        logits = model(input_ids=x).logits
        torch.nn.functional.cross_entropy(
            logits[:, :-1].flatten(0, 1), x[:, 1:].flatten()
        ).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        for layer in layers:
            events += layer.after_step(step, optimizer)
        events += optimizer.pop_events()
    assert all(isinstance(e, dict) and "event" in e for e in events), events
    return events


def two_updates(model, optimizer) -> None:
    train_steps(model, optimizer, 0, 2)


def tiny_method(weights: str, projector: str, optimizer: str) -> list[str]:
    """Overrides that select a combination on the tiny model (hidden 64): ranks that fit its
    matrices (the weights' above the projector's) and a basis refresh every 2 steps, where the
    methods have those keys."""
    overrides = [f"weights.name={weights}", f"optim.projector.name={projector}"]
    overrides.append(f"optim.name={optimizer}")
    if getattr(PARAMETERIZATIONS.get(weights).Config(), "rank", 0) > 16:
        overrides.append("weights.rank=16")
    defaults = PROJECTORS.get(projector).Config()
    if getattr(defaults, "rank", 0) > 8:
        overrides.append("optim.projector.rank=8")
    if hasattr(defaults, "update_gap"):
        overrides.append("optim.projector.update_gap=2")
    return overrides


def mechanism(projector: str) -> tuple:
    """How a projector works, for picking one of each to resume: the classes that define its
    `direction` and its `refresh`, and which shared options it has."""
    cls = PROJECTORS.get(projector)

    def definer(attr: str) -> str:
        return next(c.__name__ for c in cls.__mro__ if attr in vars(c))

    keys = {f.name for f in dataclasses.fields(cls.Config)}
    return definer("direction"), definer("refresh"), tuple(sorted(keys & {"rank", "svd"}))


SUPPORTED = supported_combinations()  # from the registries at collection: new methods join


def one_of_each_mechanism() -> list[tuple[str, str, str]]:
    """Accepted combinations covering every parameterization, projector mechanism and inner
    optimizer at least once (a full matrix of resumes would not fit the suite's budget)."""
    seen: set = set()
    chosen = []
    # projector none first: the inner optimizers are then covered by their cheapest runs
    for w, p, o in sorted(SUPPORTED, key=lambda c: c[1] != "none"):
        new = {("weights", w), ("projector", mechanism(p)), ("optimizer", o)} - seen
        if new:
            seen |= new
            chosen.append((w, p, o))
    return chosen


RESUMED = one_of_each_mechanism()


@pytest.mark.parametrize(
    "weights, projector, optimizer", SUPPORTED, ids=["+".join(c) for c in SUPPORTED]
)
def test_every_supported_combination_trains_and_every_layer_moves(
    tiny_run, weights, projector, optimizer
):
    """Conformance: each registered parameterization x projector x optimizer that validate
    accepts trains through the loop's builders; every trainable tensor is owned exactly once,
    and within two updates every parameterized layer's function (its dense weight) and every
    other tensor changes."""
    cfg, model, opt = tiny_model_and_optimizer(
        tiny_run, *tiny_method(weights, projector, optimizer)
    )
    check_ownership(model, opt)
    layers = {n: m for n, m in model.named_modules() if isinstance(m, ParameterizedLinear)}
    assert len(layers) == 7 * 2  # seven projections in each of two layers
    before_layers = {n: m.dense_weight().detach().clone() for n, m in layers.items()}
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    two_updates(model, opt)
    frozen = [n for n, m in layers.items() if torch.equal(m.dense_weight(), before_layers[n])]
    assert not frozen, f"layers whose function did not change: {frozen}"
    still = [
        n for n, p in model.named_parameters() if p.requires_grad and torch.equal(p, before[n])
    ]
    assert not still, f"tensors that never moved: {still}"
    for name, layer in layers.items():
        assert sum(layer.stored_bytes().values()) > 0, name
    for p in model.parameters():  # each tensor's state is reachable through the loop's optimizer
        assert opt.param_state(p) is opt.owner(p).state[p]


def test_the_matrix_covers_the_registries():
    """Every registered method is in at least one accepted combination, and each refused one
    carries a one-line reason."""
    accepted = supported_combinations()
    assert {w for w, _, _ in accepted} == set(PARAMETERIZATIONS.names())
    assert {p for _, p, _ in accepted} == set(PROJECTORS.names())
    assert {o for _, _, o in accepted} == set(OPTIMIZERS.names())
    assert ("dense", "none", "adamw") in accepted
    refusals = [r for *_, r in combinations() if r is not None]
    assert all("\n" not in r for r in refusals), refusals


def flat_state(tree, prefix: str = "") -> dict:
    if isinstance(tree, dict):
        items = tree.items()
    elif isinstance(tree, list | tuple):
        items = enumerate(tree)
    else:
        return {prefix: tree}
    return {k: v for key, sub in items for k, v in flat_state(sub, f"{prefix}{key}.").items()}


@pytest.mark.parametrize(
    "weights, projector, optimizer", RESUMED, ids=["+".join(c) for c in RESUMED]
)
def test_one_of_each_mechanism_resumes_bitwise(tiny_run, tmp_path, weights, projector, optimizer):
    """Train 2 steps, save a checkpoint, load it into a fresh model and optimizer, train 2
    more, through a refresh where the projector refreshes (steps 1 and 3 at update_gap 2):
    weights and optimizer state equal those of 4 uninterrupted steps, bitwise."""
    overrides = tiny_method(weights, projector, optimizer)
    cfg, straight, straight_opt = tiny_model_and_optimizer(tiny_run, *overrides)
    train_steps(straight, straight_opt, 0, 4)

    _, model, opt = tiny_model_and_optimizer(tiny_run, *overrides)
    train_steps(model, opt, 0, 2)
    path = save_checkpoint(
        tmp_path / "checkpoints",
        2,
        model_state=model.state_dict(),
        optimizer_state=opt.state_dict(),
        trainer_state={"step": 2},
        config_yaml=dump_yaml(cfg),
        tokenizer_json="{}",
        keep_last=1,
    )
    checkpoint = load_checkpoint(path)  # weights_only, as a resume loads it
    _, resumed, resumed_opt = tiny_model_and_optimizer(tiny_run, *overrides)
    resumed.load_state_dict(checkpoint.model)
    resumed_opt.load_state_dict(checkpoint.optimizer)
    train_steps(resumed, resumed_opt, 2, 4)

    a, b = straight.state_dict(), resumed.state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])]
    want, got = flat_state(straight_opt.state_dict()), flat_state(resumed_opt.state_dict())
    assert want.keys() == got.keys()
    for key, value in want.items():
        if isinstance(value, torch.Tensor):
            assert value.dtype == got[key].dtype and torch.equal(value, got[key]), key
        else:
            assert value == got[key], key


@pytest.mark.filterwarnings("ignore:optimizer contains a parameter group with duplicate parameters")
def test_ownership_check_catches_a_missing_and_a_doubled_tensor(tiny_run):
    cfg, model, _ = tiny_model_and_optimizer(tiny_run)
    params = list(model.parameters())
    missing = MultiOptimizer({"a": torch.optim.AdamW(params[1:])})
    with pytest.raises(RuntimeError, match="not owned"):
        check_ownership(model, missing)
    doubled = MultiOptimizer({"a": torch.optim.AdamW(params), "b": torch.optim.AdamW(params[:1])})
    with pytest.raises(RuntimeError, match="owned twice"):
        check_ownership(model, doubled)


def test_routing_gives_embeddings_and_norms_lr_other_and_no_decay_to_vectors(tiny_run):
    cfg, model, opt = tiny_model_and_optimizer(
        tiny_run, "train.lr=1e-3", "train.lr_other=5e-3", "optim.weight_decay=0.1"
    )
    groups = {g["name"]: g for g in opt.param_groups}
    assert groups["matrices"]["lr"] == 1e-3 and groups["matrices"]["weight_decay"] == 0.1
    assert groups["embeddings"]["lr"] == 5e-3 and set(groups["embeddings"]["param_names"]) == {
        "model.embed_tokens.weight",
        "lm_head.weight",
    }
    assert (
        groups["norms_no_decay"]["lr"] == 5e-3 and groups["norms_no_decay"]["weight_decay"] == 0.0
    )
    assert all(n.endswith("norm.weight") for n in groups["norms_no_decay"]["param_names"])


def test_adamw8bit_keeps_32bit_state_for_embeddings(tiny_run):
    _, model, opt = tiny_model_and_optimizer(
        tiny_run, "optim.name=adamw8bit", "model.hidden_size=128"
    )
    two_updates(model, opt)
    emb = model.get_input_embeddings().weight
    state32 = opt.optimizers["adamw32bit"].state[emb]
    assert state32["state1"].dtype == torch.float32
    big = model.model.layers[0].mlp.up_proj.weight  # 176 x 128 >= 4096 elements: 8-bit moments
    assert opt.optimizers["adamw8bit"].state[big]["state1"].dtype == torch.uint8


def test_embeddings_8bit_puts_embeddings_into_the_8bit_optimizer(tiny_run):
    _, model, opt = tiny_model_and_optimizer(
        tiny_run, "optim.name=adamw8bit", "optim.embeddings_8bit=true", "model.hidden_size=128"
    )
    assert "adamw32bit" not in opt.optimizers
    two_updates(model, opt)
    emb = model.get_input_embeddings().weight
    assert opt.optimizers["adamw8bit"].state[emb]["state1"].dtype == torch.uint8


def test_embeddings_8bit_needs_adamw8bit(tiny_run):
    with pytest.raises(ConfigError, match="optim.embeddings_8bit: applies to optim.name=adamw8bit"):
        load_run(tiny_run(), ["optim.embeddings_8bit=true"])


def test_dense_keeps_the_seeded_init_draw(tiny_run):
    cfg, _ = load_run(tiny_run())
    a, b = build_model(cfg, 512, CPU), build_model(cfg, 512, CPU)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters(), strict=True))
    cfg2, _ = load_run(tiny_run(), ["train.seed=1"])
    c = build_model(cfg2, 512, CPU)
    assert not torch.equal(
        a.model.layers[0].self_attn.q_proj.weight, c.model.layers[0].self_attn.q_proj.weight
    )
    std = a.model.layers[0].mlp.up_proj.weight.std().item()
    assert 0.018 < std < 0.022  # LLaMA's initializer_range 0.02


def test_registry_refuses_duplicates_and_suggests():
    reg: Registry = Registry("thing")

    class A:
        name = "alpha"

    reg.register(A)
    with pytest.raises(ValueError, match="registered twice"):
        reg.register(A)
    with pytest.raises(UnknownName, match="did you mean alpha"):
        reg.get("alpah")


def test_methods_command_lists_the_registries_and_the_accepted_matrix(capsys, monkeypatch):
    class Picky(Projector):
        """A projector with a form only under adamw (registered for this test only)."""

        name = "picky_test"

        @dataclasses.dataclass
        class Config:
            pass

        def validate(self, cfg):
            if cfg.optim.name != "adamw":
                raise ConfigError(f"optim.name: {cfg.optim.name} has no form under picky_test")

    monkeypatch.setitem(PROJECTORS._entries, Picky.name, Picky)
    assert main(["methods"]) == 0
    out = capsys.readouterr().out
    for name in PARAMETERIZATIONS.names() + PROJECTORS.names() + OPTIMIZERS.names():
        assert f"  {name} " in out
    matrix = out.split("supported combinations")[1].splitlines()[1:]
    pairs = {" ".join(line.split()[:3]): line.split(None, 3)[3] for line in matrix}
    assert pairs["dense + picky_test"] == "adamw"  # not every pair: adamw8bit is refused
    assert pairs["dense + none"] == ", ".join(OPTIMIZERS.names())


# fp32 logits: dense W in both (1e-6), or s B (A x) against (s B A) x, another rounding order
@pytest.mark.parametrize(
    "weights, atol",
    [
        ({"name": "dense"}, 1e-6),
        ({"name": "lowrank", "rank": 16}, 1e-5),
        ({"name": "sltrain", "rank": 16}, 1e-5),
        ({"name": "lost", "rank": 16}, 1e-5),
        ({"name": "loqt", "rank": 16}, 1e-5),
        # int8: the same fp32 deq(W) in both; x @ W^T against F.linear may sum in another order
        ({"name": "int8"}, 1e-5),
    ],
)
def test_export_round_trip_gives_the_same_logits(tiny_run, tmp_path, weights, atol):
    path = tiny_run("export", {"train": {"steps": 4}, "weights": weights})
    assert main(["train", str(path), "--samples", "0"]) == 0
    run_dir = tmp_path / "runs" / "export"
    out = tmp_path / "hf"
    assert main(["export", str(run_dir), str(out)]) == 0
    hf = LlamaForCausalLM.from_pretrained(out)
    tok = PreTrainedTokenizerFast.from_pretrained(out)
    ids = torch.tensor([tok.encode("The history of the city")])
    cfg, _ = load_run(run_dir / "config.yaml")
    ours = build_model(cfg, 512, CPU)
    ours.load_state_dict(load_checkpoint(checkpoint_of(run_dir)).model)
    with torch.no_grad():
        assert torch.allclose(
            hf(input_ids=ids).logits, ours(input_ids=ids).logits, atol=atol, rtol=0
        )
    assert tok.eos_token == "<|endoftext|>" and len(tok) == 512


def test_export_of_a_layer_without_a_dense_weight_is_one_line(tiny_run, tmp_path, capsys):
    extra = {"name": "lowrank", "rank": 8, "init": "cola", "activation": "silu"}
    path = tiny_run("cola", {"train": {"steps": 3}, "weights": extra})
    assert main(["train", str(path), "--samples", "0"]) == 0
    capsys.readouterr()
    assert main(["export", str(tmp_path / "runs" / "cola"), str(tmp_path / "hf")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "has no dense weight" in err, err


def test_inits_drawn_ahead_on_threads_equal_the_serial_draws(monkeypatch):
    """swap_linears draws a few layers ahead on a pool; each layer's init still comes from its
    own generator of (seed, name), so the values and their order are the serial ones."""
    from lowrank_train.parameterizations import base

    monkeypatch.setattr(base, "DRAWS_AHEAD", 3)
    targets = [
        (f"layers.{i}.proj", None, None, torch.nn.Linear(8 + i, 5, bias=i % 2 == 0, device="meta"))
        for i in range(7)
    ]
    ahead = list(base.drawn_ahead(targets, 11, 0.02))
    for (name, _, _, meta), linear in zip(targets, ahead, strict=True):
        serial = base.drawn_linear(meta, name, 11, 0.02)
        assert torch.equal(linear.weight, serial.weight) and linear.weight.shape == (
            5,
            8 + int(name.split(".")[1]),
        )
        assert (linear.bias is None) == (serial.bias is None)


@pytest.mark.parametrize("method", ["dense", "int8"])
def test_each_init_reaches_convert_in_its_methods_transfer_dtype(tiny_run, monkeypatch, method):
    """Dense only casts, so its init travels already cast (the device never holds the fp32
    copy); a quantizer reads the fp32 draw. Either way the values are the fp32 draw's."""
    from lowrank_train.models import INIT_STD
    from lowrank_train.parameterizations import base

    cls = PARAMETERIZATIONS.get(method)
    seen: dict[str, torch.Tensor] = {}
    original = cls.convert

    def recording(self, linear, name, gen, dtype):
        seen[name] = linear.weight.detach().clone()
        return original(self, linear, name, gen, dtype)

    monkeypatch.setattr(cls, "convert", recording)
    cfg, _ = load_run(tiny_run(), [f"weights.name={method}", "model.dtype=bfloat16"])
    build_model(cfg, 512, torch.device("cpu"))
    expected = torch.bfloat16 if method == "dense" else torch.float32
    assert len(seen) == 14 and {w.dtype for w in seen.values()} == {expected}
    for name, weight in seen.items():
        meta = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=False, device="meta")
        draw = base.drawn_linear(meta, name, cfg.train.seed, INIT_STD).weight
        assert torch.equal(weight, draw.to(expected)), name


def _converted(name: str, m: int = 48, n: int = 32) -> ParameterizedLinear:
    """A layer of parameterization `name` converted from a seeded (m, n) Linear, at ranks and
    groups that fit it."""
    cls = PARAMETERIZATIONS.get(name)
    keys = {f.name for f in dataclasses.fields(cls.Config)}
    options = {"rank": 8} if "rank" in keys else {}
    if "group_size" in keys:
        options["group_size"] = 64
    linear = torch.nn.Linear(n, m, bias=False)
    with torch.no_grad():
        linear.weight.normal_(0.0, 0.02, generator=torch.Generator().manual_seed(0))
    gen = torch.Generator().manual_seed(1)
    return cls(cls.Config(**options)).convert(linear, "layer", gen, torch.float32)


@pytest.mark.parametrize("name", PARAMETERIZATIONS.names())
def test_every_parameterization_compiles_under_inductor_to_the_eager_result(name):
    """The inductor test of the whole set: forward and backward with fullgraph=True (a graph
    break raises), output, input gradient, parameter gradients and the side buffers that the
    backward writes (writers' and any other non-persistent buffer) equal to eager."""
    torch._dynamo.reset()
    layer = _converted(name)
    for writer in layer.writers().values():
        writer.acquire_grad()  # a writer's buffer starts released (per-layer mode's contract)
    params = [p for p in layer.parameters() if p.requires_grad]
    sides = [b for n, b in layer.named_buffers() if n in layer._non_persistent_buffers_set]
    sides = [b for b in sides if b.is_floating_point()]
    x = torch.randn(2, 5, 32, generator=torch.Generator().manual_seed(2))
    results = []
    for forward in (layer, torch.compile(layer, backend="inductor", fullgraph=True)):
        for b in sides:
            b.zero_()
        inp = x.clone().requires_grad_()
        out = forward(inp)
        grads = torch.autograd.grad(out.square().sum(), [inp, *params], allow_unused=True)
        results.append([out, *(g for g in grads if g is not None), *(b.clone() for b in sides)])
    eager, compiled = results
    assert len(eager) == len(compiled) >= 2
    for a, b in zip(eager, compiled, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
    assert all(b.abs().sum() > 0 for b in sides)  # the backward wrote them
