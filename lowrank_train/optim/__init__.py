"""build_optimizer: route every trainable tensor to exactly one optimizer group.

Groups: the model's matrices at `train.lr` with weight decay; embeddings and lm_head at
`train.lr_other` with weight decay (marked `embedding`: 32-bit state under adamw8bit); norms
and biases without decay (norms at lr_other). Projectable tensors go to the projector's
ProjectedOptimizer; quantized tensors (the layers' writers) always go to lowrank-train's own Adam,
a ProjectedOptimizer with the run's projector or, without one, the identity map (`FullAdam`),
whatever `optim.name` says (it governs the dense tensors). The loop never sees the routing.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass

import torch
from torch import nn

from lowrank_train.config import RunConfig
from lowrank_train.modules import is_norm
from lowrank_train.optim.base import OPTIMIZERS
from lowrank_train.optim.multi import MultiOptimizer
from lowrank_train.optim.per_layer import PerLayerOptimizer, check_per_layer
from lowrank_train.optim.projected import ProjectedOptimizer
from lowrank_train.parameterizations import ParameterizedLinear
from lowrank_train.parameterizations.base import Writer
from lowrank_train.projectors import PROJECTORS
from lowrank_train.projectors.base import FullAdam

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Role:
    other: bool  # embeddings, norms, lm_head: lr_other
    decay: bool
    embedding: bool


def parameter_roles(model: nn.Module) -> dict[str, tuple[nn.Parameter, Role]]:
    """name -> (parameter, role) for every trainable parameter, by the module that owns it."""
    out_emb = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    roles = {}
    for mod_name, module in model.named_modules():
        is_embedding = isinstance(module, nn.Embedding) or module is out_emb
        norm = is_norm(module)
        for p_name, p in module.named_parameters(recurse=False):
            if not p.requires_grad:
                continue
            full = f"{mod_name}.{p_name}" if mod_name else p_name
            roles[full] = (
                p,
                Role(other=is_embedding or norm, decay=p.ndim >= 2, embedding=is_embedding),
            )
    return roles


def build_groups(model: nn.Module, cfg: RunConfig) -> list[dict]:
    lr_other = cfg.train.lr_other or cfg.train.lr
    buckets: dict[Role, list[tuple[str, nn.Parameter]]] = {}
    for name, (p, role) in parameter_roles(model).items():
        buckets.setdefault(role, []).append((name, p))
    groups = []
    for role, named in sorted(
        buckets.items(), key=lambda kv: (kv[0].other, kv[0].embedding, not kv[0].decay)
    ):
        label = ("embeddings" if role.embedding else "norms" if role.other else "matrices") + (
            "" if role.decay else "_no_decay"
        )
        groups.append(
            {
                "name": label,
                "params": [p for _, p in named],
                "param_names": [n for n, _ in named],
                "lr": lr_other if role.other else cfg.train.lr,
                "weight_decay": cfg.optim.weight_decay if role.decay else 0.0,
                "embedding": role.embedding,
            }
        )
    return groups


def projectable_tensors(model: nn.Module) -> dict[str, nn.Parameter]:
    """name -> tensor for every 2-D tensor a parameterized layer offers a projector."""
    out = {}
    for mod_name, module in model.named_modules():
        if isinstance(module, ParameterizedLinear):
            for attr, p in module.projectable().items():
                if p.requires_grad:
                    out[f"{mod_name}.{attr}"] = p
    return out


def writer_tensors(model: nn.Module) -> dict[str, Writer]:
    """name -> writer of every quantized tensor of the parameterized layers."""
    return {
        w.name: w
        for module in model.modules()
        if isinstance(module, ParameterizedLinear)
        for w in module.writers().values()
    }


def split_projected(
    groups: list[dict], model: nn.Module, cfg: RunConfig
) -> tuple[list[dict], dict | None]:
    """Moves the projectable tensors out of the matrix groups into one projected group (lr
    train.lr, decay optim.weight_decay); None when no projector is set."""
    if cfg.optim.projector.name == "none":
        return groups, None
    wanted = {id(p) for p in projectable_tensors(model).values()}
    projected = {"name": "projected", "params": [], "param_names": []}
    kept = []
    for g in groups:
        named = list(zip(g["param_names"], g["params"], strict=True))
        for n, p in named:
            if id(p) in wanted:
                projected["params"].append(p)
                projected["param_names"].append(n)
        keep = [(n, p) for n, p in named if id(p) not in wanted]
        if keep:
            kept.append({**g, "params": [p for _, p in keep], "param_names": [n for n, _ in keep]})
    return kept, {**projected, "lr": cfg.train.lr, "weight_decay": cfg.optim.weight_decay}


def build_optimizer(
    cfg: RunConfig, model: nn.Module, device: torch.device
) -> MultiOptimizer | PerLayerOptimizer:
    """The run's optimizer; logs what each inner optimizer owns and checks ownership. With
    `optim.per_layer`, wrapped to step each tensor inside backward."""
    groups, projected = split_projected(build_groups(model, cfg), model, cfg)
    inner = OPTIMIZERS.get(cfg.optim.name)().build(groups, cfg.optim, device)
    writers = writer_tensors(model)
    own = [projected] if projected is not None else []
    if writers:
        own.append(
            {
                "name": "quantized",
                "params": [w.tensor for w in writers.values()],
                "param_names": list(writers),
                "lr": cfg.train.lr,
                "weight_decay": cfg.optim.weight_decay,
            }
        )
    if own:
        proj = cfg.optim.projector
        projector = (
            PROJECTORS.get(proj.name)(proj.method, seed=cfg.train.seed)
            if proj.name != "none"
            else FullAdam()
        )
        inner[projector.name] = ProjectedOptimizer(
            own,
            projector,
            betas=cfg.optim.betas,
            eps=cfg.optim.eps,
            state_dtype=cfg.optim.state_dtype,
            writers=writers.values(),
            keep_side_buffers=not cfg.optim.per_layer,
        )
    names = {p: n for n, p in model.named_parameters()} | {w.tensor: n for n, w in writers.items()}
    optimizer = MultiOptimizer(inner, names)
    for name, opt in inner.items():
        params = [p for g in opt.param_groups for p in g["params"]]
        log.info(
            "optimizer %s owns %d tensors (%s parameters): %s",
            name,
            len(params),
            f"{sum(p.numel() for p in params):,}",
            ", ".join(f"{g['name']} {len(g['params'])}" for g in opt.param_groups),
        )
    check_ownership(model, optimizer)
    if cfg.optim.per_layer:
        check_per_layer()
        return PerLayerOptimizer(
            optimizer, model, cfg.train.grad_accum, cfg.optim.per_layer_accumulation
        )
    return optimizer


def check_ownership(model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Every trainable tensor (parameters and the writers' quantized tensors) is owned by exactly
    one optimizer group; raises otherwise.

    The peers' silent failure: a parameter no optimizer owns never updates, and nothing says so.
    """
    owned = Counter(id(p) for g in optimizer.param_groups for p in g["params"])
    trained = {n: p for n, p in model.named_parameters() if p.requires_grad} | {
        n: w.tensor for n, w in writer_tensors(model).items()
    }
    names = {id(p): n for n, p in model.named_parameters()} | {id(t): n for n, t in trained.items()}
    missing = [n for n, t in trained.items() if owned[id(t)] == 0]
    twice = [names.get(i, "?") for i, c in owned.items() if c > 1]
    foreign = [i for i in owned if i not in names]
    if missing or twice or foreign:
        raise RuntimeError(
            f"optimizer ownership broken: not owned {missing[:5]}, owned twice {twice[:5]}, "
            f"{len(foreign)} tensors not in the model"
        )
