"""Plug points: every registered method runs through the loop, every tensor is owned once and
moves, `methods` lists the registries, and export gives a plain HF model with the same logits."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

from lowrank_train.checkpoint import load_checkpoint
from lowrank_train.cli import main
from lowrank_train.config import load_config
from lowrank_train.export import checkpoint_of
from lowrank_train.models import build_model
from lowrank_train.optim import build_optimizer, check_ownership
from lowrank_train.optim.multi import MultiOptimizer
from lowrank_train.parameterizations import PARAMETERIZATIONS, ParameterizedLinear
from lowrank_train.projectors import PROJECTORS
from lowrank_train.registry import Registry, UnknownName

CPU = torch.device("cpu")


def tiny_model_and_optimizer(tiny_run, *overrides: str):
    cfg, _ = load_config(tiny_run(), list(overrides))
    model = build_model(cfg, 512, CPU)
    return cfg, model, build_optimizer(cfg, model, CPU)


def two_updates(model, optimizer) -> None:
    gen = torch.Generator().manual_seed(0)
    for _ in range(2):
        x = torch.randint(0, 512, (2, 16), generator=gen)
        logits = model(input_ids=x).logits
        torch.nn.functional.cross_entropy(
            logits[:, :-1].flatten(0, 1), x[:, 1:].flatten()
        ).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


@pytest.mark.parametrize("weights", PARAMETERIZATIONS.names())
@pytest.mark.parametrize("projector", PROJECTORS.names())
@pytest.mark.parametrize("optimizer", ["adamw", "adamw8bit"])
def test_every_registered_combination_runs_and_every_layer_moves(
    tiny_run, weights, projector, optimizer
):
    """Conformance: each registered parameterization x projector x optimizer trains through the
    loop's builders; every trainable tensor is owned exactly once, and within two updates every
    parameterized layer's function (its dense weight) and every other tensor changes."""
    cfg, model, opt = tiny_model_and_optimizer(
        tiny_run,
        f"weights.name={weights}",
        f"optim.projector.name={projector}",
        f"optim.name={optimizer}",
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


def test_dense_keeps_the_seeded_init_draw(tiny_run):
    cfg, _ = load_config(tiny_run())
    a, b = build_model(cfg, 512, CPU), build_model(cfg, 512, CPU)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters(), strict=True))
    cfg2, _ = load_config(tiny_run(), ["train.seed=1"])
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


def test_methods_command_lists_the_registries(capsys):
    assert main(["methods"]) == 0
    out = capsys.readouterr().out
    for name in PARAMETERIZATIONS.names() + PROJECTORS.names() + ["adamw", "adamw8bit"]:
        assert f"  {name} " in out


def test_export_round_trip_gives_the_same_logits(tiny_run, tmp_path):
    path = tiny_run("export", {"train": {"steps": 4}})
    assert main(["train", str(path), "--samples", "0"]) == 0
    run_dir = tmp_path / "runs" / "export"
    out = tmp_path / "hf"
    assert main(["export", str(run_dir), str(out)]) == 0
    hf = LlamaForCausalLM.from_pretrained(out)
    tok = PreTrainedTokenizerFast.from_pretrained(out)
    ids = torch.tensor([tok.encode("The history of the city")])
    cfg, _ = load_config(run_dir / "config.yaml")
    ours = build_model(cfg, 512, CPU)
    ours.load_state_dict(load_checkpoint(checkpoint_of(run_dir)).model)
    with torch.no_grad():
        assert torch.allclose(
            hf(input_ids=ids).logits, ours(input_ids=ids).logits, atol=1e-6, rtol=0
        )
    assert tok.eos_token == "<|endoftext|>" and len(tok) == 512
