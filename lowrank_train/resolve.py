"""The resolve step: method sections (parsed by config.py into a name and a plain dict) become
the registered methods' own `Config` dataclasses, and the methods check the run.

config.py imports no method package; this module is where the registries meet the config.
Everyone loads a run through `load_run` (the CLI, the trainer's tests, benchmarks, scripts).
Errors are one `ConfigError` line naming the file, the dotted key, the value and what is
allowed, as in config.py.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Any

from lowrank_train.config import (
    CLI,
    MethodSection,
    ProjectorConfig,
    RunConfig,
    Sources,
    build,
    config_from_dict,
    field_docs,
    flatten,
    load_config,
    to_dict,
)
from lowrank_train.errors import ConfigError
from lowrank_train.optim.base import OPTIMIZERS
from lowrank_train.parameterizations import PARAMETERIZATIONS
from lowrank_train.projectors import PROJECTORS
from lowrank_train.projectors.base import SVDOptions
from lowrank_train.registry import Registry, UnknownName, suggest

# (dotted prefix, registry) of every method section
SECTIONS: tuple[tuple[str, Registry], ...] = (
    ("weights.", PARAMETERIZATIONS),
    ("optim.projector.", PROJECTORS),
)


def load_run(path: str | Path, overrides: list[str] = ()) -> tuple[RunConfig, Sources]:
    """The one entry point for a run: compose, override, check, and resolve the methods.

    Returns the config with `weights.method` and `optim.projector.method` set to the
    registered classes' Config instances (built with the user's options) and the source file
    of every key. Raises ConfigError (one line).
    """
    cfg, sources = load_config(path, overrides)
    return resolve(cfg, sources, str(path)), sources


def resolve(cfg: RunConfig, sources: Sources, run_file: str = CLI) -> RunConfig:
    """Build each method section's Config from its parsed options, then `check_methods`.
    In place (and returned); resolving twice gives the same result."""
    for prefix, registry in SECTIONS:
        section = _section(cfg, prefix)
        section.method = _method_config(registry, section, prefix, sources, run_file)
    check_methods(cfg, sources, run_file)
    return cfg


def _section(cfg: RunConfig, prefix: str) -> MethodSection:
    node: Any = cfg
    for part in prefix.rstrip(".").split("."):
        node = getattr(node, part)
    return node


def _keys(config_cls: type) -> list[str]:
    return [f.name for f in dataclasses.fields(config_cls)]


def _method_config(
    registry: Registry, section: MethodSection, prefix: str, sources: Sources, run_file: str
) -> Any:
    where = f"{sources.of(prefix + 'name', run_file)}: {prefix}name"
    try:
        cls = registry.get(section.name)
    except UnknownName as e:
        raise ConfigError(f"{where}: {e.message}") from None
    keys = _keys(cls.Config)
    # Keys of other methods of this section (and the projectors' shared options): setting one
    # here is a different mistake from a typo, and says so.
    elsewhere = {k for other in registry for k in _keys(other.Config)}
    if registry is PROJECTORS:
        elsewhere |= set(_keys(SVDOptions))
    own = [f.name for f in dataclasses.fields(section) if f.name not in ("options", "method")]
    for key, value in section.options.items():
        if key in keys:
            continue
        here = f"{sources.of(prefix + key, run_file)}: {prefix}{key}"
        its = f"its keys: {', '.join(keys)}" if keys else "it has no keys"
        if key in elsewhere:
            raise ConfigError(
                f"{here}: {value!r} does not apply to {registry.kind} {section.name} ({its})"
            )
        known = sorted(set(own) | set(keys))
        hint = suggest(key, sorted(set(known) | elsewhere)) or f" ({its})"
        raise ConfigError(f"{here}: unknown key of {section.name}{hint}")
    return build(cls.Config, section.options, prefix, sources, run_file)


def projector_options(name: str, options: dict[str, Any], origin: str) -> Any:
    """The Config of projector `name` from keyword options, checked as a run file's
    `optim.projector` keys are (unknown or misplaced keys, types): `projected_optimizer`'s
    path to the same one-line errors. `origin` stands where a file name would."""
    section = ProjectorConfig(name=name, options=dict(options))
    return _method_config(PROJECTORS, section, "optim.projector.", Sources(), origin)


def check_methods(cfg: RunConfig, sources: Sources, run_file: str = CLI) -> None:
    """The checks that need the registries: the inner optimizer's name, `state_dtype` with
    something to govern, and each method's `validate`, on methods built with the run's options.

    A method's `validate` raises `ConfigError("optim.projector.rank: ...")`; the file that set
    that key is put in front here.
    """

    def fail(key: str, message: str) -> None:
        raise ConfigError(f"{sources.of(key, run_file)}: {key}: {message}")

    if cfg.optim.name not in OPTIMIZERS:
        fail("optim.name", UnknownName("optimizer", cfg.optim.name, OPTIMIZERS.names()).message)
    weights = PARAMETERIZATIONS.get(cfg.weights.name)(cfg.weights.method)
    projector = PROJECTORS.get(cfg.optim.projector.name)(cfg.optim.projector.method)
    if cfg.optim.state_dtype != "auto" and projector.name == "none" and not _has_writers(cfg):
        fail(
            "optim.state_dtype",
            f"{cfg.optim.state_dtype} has no effect: no tensor is trained by lowrank-train's own "
            "Adam (set a projector or quantized weights); the optimizer's own state rules apply",
        )
    if cfg.optim.per_layer_accumulation == "projected" and not projector.accumulates_projected:
        fail(
            "optim.per_layer_accumulation",
            "projected needs a projector whose update reads only the projected gradient "
            f"(galore, qgalore); {projector.name} reads the full gradient: use full",
        )
    for method in (weights, projector):
        try:
            method.validate(cfg)
        except ConfigError as e:
            raise ConfigError(_located(str(e), cfg, sources, run_file)) from None


def _has_writers(cfg: RunConfig) -> bool:
    """Whether the run's layers have quantized tensors (writers), from a structural build."""
    import torch

    from lowrank_train.models import build_model  # lazily: models imports the registries
    from lowrank_train.optim import writer_tensors

    return bool(writer_tensors(build_model(cfg, 256, torch.device("meta"))))


_KEY = re.compile(r"^[a-z_][a-z0-9_]*(\.[a-z_][a-z0-9_]*)*$")


def _located(message: str, cfg: RunConfig, sources: Sources, run_file: str) -> str:
    """'optim.projector.rank: ...' -> '<file that set it>: optim.projector.rank: ...'."""
    key = message.split(": ", 1)[0]
    keys = flatten(to_dict(cfg))
    if _KEY.match(key) and any(k == key or k.startswith(key + ".") for k in keys):
        return f"{sources.of(key, run_file)}: {message}"
    return message


# The minimal run's projector rank, at most: the default model's narrowest projectable side is
# 128 (a low-rank factor at the weights' default rank), and APOLLO's default rank is 256.
MINIMAL_RANK = 64


def combinations() -> list[tuple[str, str, str, str | None]]:
    """(weights, projector, optimizer, None if `validate` accepts a minimal run of it, else the
    refusal) for every registered triple, in registry order. The minimal run is the default
    model with the projector's rank capped at MINIMAL_RANK, so only refusals of the
    composition itself remain."""
    out = []
    for weights in PARAMETERIZATIONS.names():
        for projector in PROJECTORS.names():
            for optimizer in OPTIMIZERS.names():
                section: dict[str, Any] = {"name": projector}
                rank = getattr(PROJECTORS.get(projector).Config(), "rank", None)
                if rank is not None:  # the matrix is about composition, not size: a rank that
                    section["rank"] = min(rank, MINIMAL_RANK)  # fits every factor's side
                tree = {
                    "train": {"steps": 10},
                    "weights": {"name": weights},
                    "optim": {"name": optimizer, "projector": section},
                }
                try:
                    cfg, sources = config_from_dict(tree, run_file="minimal run")
                    resolve(cfg, sources, "minimal run")
                    refusal = None
                except ConfigError as e:
                    refusal = str(e)
                out.append((weights, projector, optimizer, refusal))
    return out


def supported_combinations() -> list[tuple[str, str, str]]:
    """(weights, projector, optimizer) triples that `validate` accepts: the conformance test's
    matrix and `lowrank-train methods`'."""
    return [(w, p, o) for w, p, o, refusal in combinations() if refusal is None]


def method_field_docs() -> list[tuple[str, str, str, Any, str]]:
    """(section, method, dotted key, default, help) for every key of every registered method's
    Config, with that method's default; a method without keys gives one row with key ''."""
    rows = []
    for prefix, registry in SECTIONS:
        section = prefix.rstrip(".")
        for cls in registry:
            docs = field_docs(cls.Config, prefix)
            if not docs:
                rows.append((section, cls.name, "", None, "no keys"))
            for key, default, help_text in docs:
                rows.append((section, cls.name, key, default, help_text))
    return rows
