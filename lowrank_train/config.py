"""The run configuration: one dataclass tree, YAML composition, `a.b=c` overrides, strict checks.

Precedence: dataclass defaults < `include:` files (in order, later wins) < the run file < CLI
overrides. Every problem is one `ConfigError` line naming the file, the dotted key, the bad
value and what is allowed.

This module imports no method package. A method section (`weights:`, `optim.projector:`) is
parsed into its `name` (and `weights.target`) plus a plain dict of its other keys
(`MethodSection.options`; `Sources` keeps the file of each); `lowrank_train.resolve` then
checks those keys against the registered method's own `Config` and runs the methods'
`validate`. A run is loaded with `resolve.load_run`; `load_config` here only parses.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from lowrank_train.errors import ConfigError
from lowrank_train.registry import suggest

CLI = "command line"


def knob(default: Any, help: str) -> Any:
    """A config field with its one-line documentation (shown in the README's reference)."""
    if isinstance(default, list | dict):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help})
    return field(default=default, metadata={"help": help})


PRESETS = (
    "llama_20m",
    "llama_60m",
    "llama_130m",
    "llama_350m",
    "llama_1b",
    "llama_7b",
    "llama_13b",
)
LINEAR_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass
class ModelConfig:
    preset: Literal[PRESETS] = knob("llama_20m", "model shape (models.py PRESETS)")  # type: ignore[valid-type]
    seq_len: int = knob(256, "tokens per sequence")
    dtype: Literal["auto", "float32", "bfloat16"] = knob(
        "auto", "storage of weights and gradients; auto: bfloat16 on CUDA, float32 on CPU"
    )
    autocast: Literal["auto", "off", "bfloat16"] = knob(
        "auto",
        "compute dtype; auto: bfloat16 under float32 weights on CUDA or on a CPU with native bf16 "
        "matmul (avx512_bf16/AMX), off otherwise",
    )
    gradient_checkpointing: bool = knob(False, "recompute each decoder layer in backward")
    hidden_size: int = knob(0, "override the preset (0 = preset)")
    intermediate_size: int = knob(0, "override the preset (0 = preset)")
    num_layers: int = knob(0, "override the preset (0 = preset)")
    num_heads: int = knob(0, "override the preset (0 = preset)")


@dataclass
class DataConfig:
    corpus: str = knob(
        "embedded", "'embedded' (Wikipedia intros, Shakespeare, KJV) or a local file/folder"
    )
    text_field: str = knob("text", "the text column of jsonl/parquet corpora")
    tokenizer: str = knob(
        "bpe", "bpe (trained on the corpus) | gpt2 (shipped) | a tokenizer.json path"
    )
    vocab_size: int = knob(0, "bpe only; 0 = 8192 for llama_20m, 32000 for the paper presets")
    val_tokens: int = knob(131072, "held-out tokens, whole documents, fixed for a corpus")
    cache_dir: str = knob(".cache/lowrank_train", "where token caches are built")
    cache: str = knob(
        "", "read this token-cache directory directly (train.npy, val.npy, tokenizer.json)"
    )


@dataclass
class TrainConfig:
    steps: int = knob(0, "optimizer steps (set exactly one of steps and tokens)")
    tokens: int = knob(
        0, "training tokens; steps = tokens / (batch_size * grad_accum * world * seq_len)"
    )
    batch_size: int = knob(8, "sequences per micro-batch per process")
    grad_accum: int = knob(1, "micro-batches per optimizer step")
    stop_at: int = knob(
        0, "stop after this step without changing the schedule (0 = run to the end)"
    )
    lr: float = knob(1e-3, "peak learning rate")
    lr_other: float = knob(0.0, "peak lr of embeddings, norms and lm_head (0 = lr)")
    warmup_ratio: float = knob(0.1, "fraction of steps of linear warmup, in [0, 1)")
    warmup_steps: int = knob(0, "warmup steps; > 0 overrides warmup_ratio")
    min_lr_ratio: float = knob(0.1, "cosine decays to lr * min_lr_ratio")
    clip_grad_norm: float = knob(1.0, "global gradient-norm clip (0 = off)")
    seed: int = knob(0, "seed of the init, the data order and every method's randomness")
    device: Literal["auto", "cpu", "cuda"] = knob("auto", "auto: cuda when available")
    compile: bool = knob(
        False,
        "torch.compile the forward and loss (optim.per_layer: each decoder layer; the first "
        "steps pay the compile)",
    )


@dataclass
class EvalConfig:
    every: int = knob(0, "validate every N steps (0 = only at the end)")
    max_tokens: int = knob(0, "held-out tokens per evaluation (0 = the whole split)")


@dataclass
class CheckpointConfig:
    every: int = knob(0, "save every N steps (0 = only at the end)")
    at_end: bool = knob(
        True, "save when the run ends (false for throwaway runs: a 13B save writes ~14 GB)"
    )
    keep_last: int = knob(2, "checkpoints kept")
    dir: str = knob("", "default <out_dir>/<name>/checkpoints")


@dataclass
class LoggingConfig:
    every: int = knob(10, "progress line and metrics.jsonl every N steps (the loss is read then)")
    wandb: bool = knob(False, "log to Weights & Biases")
    wandb_project: str = knob("lowrank-train", "wandb project")
    wandb_mode: Literal["offline", "online"] = knob(
        "offline", "offline: sync later with `wandb sync`"
    )


@dataclass
class MemoryConfig:
    cap_gib: float = knob(
        24.0, "CUDA: cap the allocator at this less the context (0 = no cap); CPU: not enforced"
    )


@dataclass
class MethodSection:
    """A section whose `name` picks a registered class; its other keys go to that class's Config.

    `options`: the other keys as parsed (plain values; not compared: a resolved config equals
    its reloaded dump). `method`: the registered class's `Config` built from them by
    `resolve.resolve`; None until then.
    """

    name: str = ""
    options: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)
    method: Any = None


@dataclass
class WeightsConfig(MethodSection):
    name: str = knob("dense", "weight parameterization (lowrank-train methods)")
    target: list[str] = knob(
        list(LINEAR_NAMES), "Linear layers (by attribute name) to parameterize"
    )


@dataclass
class ProjectorConfig(MethodSection):
    """Only the name: every other key, shared ones (rank, update_gap, scale, svd,
    moments_at_refresh) included, is the projector's own `Config`, with its own defaults."""

    name: str = knob("none", "gradient projector (lowrank-train methods)")


SECTION_FIELDS = ("options", "method")  # MethodSection's bookkeeping, never YAML keys


@dataclass
class OptimConfig:
    name: str = knob("adamw", "inner optimizer of the dense tensors: adamw | adamw8bit")
    embeddings_8bit: bool = knob(
        False,
        "adamw8bit: 8-bit moments for embeddings and lm_head too (the GaLore and Q-GaLore "
        "scripts do; bitsandbytes advises 32-bit, the default)",
    )
    weight_decay: float = knob(0.0, "decoupled weight decay of matrices (never norms or biases)")
    betas: tuple[float, float] = knob((0.9, 0.999), "Adam betas")
    eps: float = knob(1e-8, "Adam epsilon")
    per_layer: bool = knob(
        False, "step each tensor inside backward and free its gradient (needs clip_grad_norm=0)"
    )
    per_layer_accumulation: Literal["full", "projected"] = knob(
        "full",
        "per_layer with grad_accum > 1: full (keep each gradient until the last micro-batch: "
        "exact) or projected (sum down(G) in the basis; GaLore, Q-GaLore; refresh from the first)",
    )
    state_dtype: Literal["auto", "float32", "bfloat16", "int8"] = knob(
        "auto", "moments of lowrank-train's own Adam (projected and quantized tensors)"
    )
    projector: ProjectorConfig = field(default_factory=ProjectorConfig)


@dataclass
class RunConfig:
    name: str = knob("", "run name (default: the config file's name)")
    out_dir: str = knob("runs", "runs go to <out_dir>/<name>")
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    memory: MemoryConfig = field(default_factory=MemoryConfig)
    weights: WeightsConfig = field(default_factory=WeightsConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)

    @property
    def run_dir(self) -> Path:
        return Path(self.out_dir) / self.name

    @property
    def checkpoint_dir(self) -> Path:
        return Path(self.checkpoint.dir) if self.checkpoint.dir else self.run_dir / "checkpoints"


# ---------------------------------------------------------------------------------------------
# Loading: files -> one merged dict with the source of every leaf -> dataclasses -> checks.


class Sources(dict):
    """dotted key -> the file (or 'command line') that set it last."""

    def of(self, key: str, fallback: str) -> str:
        hits = [v for k, v in self.items() if k == key or k.startswith(key + ".")]
        return hits[-1] if hits else fallback


def _read_yaml(path: Path, origin: str) -> dict:
    if not path.is_file():
        raise ConfigError(f"{origin}: config file {str(path)!r} not found")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{path}:{where} not valid YAML ({getattr(e, 'problem', e)})") from None
    if not isinstance(data, dict):
        raise ConfigError(
            f"{path}: the top level must be a mapping of keys, not {type(data).__name__}"
        )
    return data


def _merge(dst: dict, src: dict, source: str, sources: Sources, prefix: str = "") -> None:
    for key, value in src.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict) and isinstance(dst.get(key), dict):
            _merge(dst[key], value, source, sources, dotted + ".")
        elif isinstance(value, dict):
            dst[key] = {}
            _merge(dst[key], value, source, sources, dotted + ".")
        else:
            dst[key] = value
            sources[dotted] = source


def _compose(path: Path, merged: dict, sources: Sources, stack: tuple[Path, ...]) -> None:
    """Merge `path`'s includes (in order), then `path` itself, into `merged`."""
    data = _read_yaml(path, str(stack[-1]) if stack else CLI)
    includes = data.pop("include", [])
    if isinstance(includes, str):
        includes = [includes]
    if not isinstance(includes, list) or not all(isinstance(i, str) for i in includes):
        raise ConfigError(f"{path}: include: {includes!r} is not a list of file paths")
    for inc in includes:
        target = (path.parent / inc) if (path.parent / inc).is_file() else Path(inc)
        if not target.is_file():
            raise ConfigError(
                f"{path}: include: {inc!r} not found (relative to {path.parent} or the working directory)"
            )
        if target.resolve() in {p.resolve() for p in stack + (path,)}:
            raise ConfigError(f"{path}: include: {inc!r} includes itself")
        _compose(target, merged, sources, stack + (path,))
    _merge(merged, data, str(path), sources)


def parse_override(text: str) -> tuple[str, Any]:
    """'train.lr=3e-4' -> ('train.lr', '3e-4' as YAML reads it); the field's type casts it later."""
    key, sep, raw = text.partition("=")
    if not sep or not key or " " in key:
        raise ConfigError(f"{CLI}: {text!r}: an override is key=value, e.g. train.lr=3e-4")
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError:
        value = raw
    return key.strip(), value


def _set_dotted(tree: dict, key: str, value: Any) -> None:
    parts = key.split(".")
    node = tree
    for i, part in enumerate(parts[:-1]):
        if not isinstance(node.get(part, {}), dict):
            raise ConfigError(
                f"{CLI}: {'.'.join(parts[: i + 1])}: is a value, not a section ({key}={value!r})"
            )
        node = node.setdefault(part, {})
    node[parts[-1]] = value


# ---------------------------------------------------------------------------------------------
# Casting one value to its field's type.


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(map(str, typing.get_args(tp)))
    if origin in (list, tuple):
        return str(tp).replace("typing.", "")
    return getattr(tp, "__name__", str(tp))


def cast(value: Any, tp: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    bad = ConfigError(f"{where}: {value!r} is not {_type_name(tp)}")
    if origin is Literal:
        allowed = typing.get_args(tp)
        if isinstance(value, bool) and ("off" if not value else "on") in allowed:
            value = "off" if not value else "on"  # YAML 1.1 reads a bare off/on as a bool
        if value not in allowed:
            hint = suggest(str(value), [str(a) for a in allowed])
            raise ConfigError(
                f"{where}: {value!r} is not one of {', '.join(map(str, allowed))}{hint}"
            )
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: {value!r} is not a bool (true or false)")
    if tp is int:
        if isinstance(value, bool):
            raise bad
        if isinstance(value, int):
            return value
        try:  # YAML reads 1e6 and 1_000_000 as strings; both are integers to a person
            number = float(str(value).replace("_", ""))
        except ValueError:
            raise bad from None
        if not number.is_integer():
            raise bad
        return int(number)
    if tp is float:
        if isinstance(value, bool):
            raise bad
        try:  # YAML 1.1 reads 3e-4 (no dot) as a string
            number = float(value)
        except (TypeError, ValueError):
            raise bad from None
        if not math.isfinite(number):
            raise bad
        return number
    if tp is str:
        if isinstance(value, str | int | float) and not isinstance(value, bool):
            return str(value)
        raise bad
    if origin is list:
        (item,) = typing.get_args(tp)
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, list):
            raise bad
        return [cast(v, item, where) for v in value]
    if origin is tuple:
        items = typing.get_args(tp)
        if not isinstance(value, list | tuple) or len(value) != len(items):
            raise bad
        return tuple(cast(v, t, where) for v, t in zip(value, items, strict=True))
    raise TypeError(f"config field type {tp} has no cast")  # a bug in the dataclass tree


def build(cls: type, data: dict, prefix: str, sources: Sources, run_file: str) -> Any:
    """Dataclass `cls` from `data`, refusing unknown keys and casting each value.

    A `MethodSection` keeps the keys that are not its own fields, uncast, in `options`
    (`resolve` checks them against the method's Config). Used by `resolve` for those Configs.
    """
    hints = typing.get_type_hints(cls)
    method_section = issubclass(cls, MethodSection)
    own = {f.name for f in dataclasses.fields(cls)} - (
        set(SECTION_FIELDS) if method_section else set()
    )
    kwargs: dict[str, Any] = {}
    options: dict[str, Any] = {}
    for key, value in data.items():
        dotted = prefix + key
        where = f"{sources.of(dotted, run_file)}: {dotted}"
        if key in own:
            tp = hints[key]
            if dataclasses.is_dataclass(tp):
                if not isinstance(value, dict):
                    raise ConfigError(f"{where}: is a section; give keys under it, not {value!r}")
                kwargs[key] = build(tp, value, dotted + ".", sources, run_file)
            else:
                kwargs[key] = cast(value, tp, where)
        elif method_section:
            options[key] = value
        else:
            choices = sorted(own)
            raise ConfigError(
                f"{where}: unknown key{suggest(key, choices) or ' (known: ' + ', '.join(choices) + ')'}"
            )
    for key in own - kwargs.keys():  # absent sections still build
        if dataclasses.is_dataclass(hints[key]):
            kwargs[key] = build(hints[key], {}, f"{prefix}{key}.", sources, run_file)
    if method_section:
        kwargs["options"] = options
    return cls(**kwargs)


def config_from_dict(
    tree: dict, sources: Sources | None = None, run_file: str = CLI
) -> tuple[RunConfig, Sources]:
    """Build and check a run config from a merged YAML tree (methods not resolved yet)."""
    sources = sources if sources is not None else Sources()
    cfg = build(RunConfig, tree, "", sources, run_file)
    validate(cfg, sources, run_file)
    return cfg, sources


def load_config(path: str | Path, overrides: list[str] = ()) -> tuple[RunConfig, Sources]:
    """Compose, override, build and check a run config; methods stay unresolved (their keys
    in `options`, `method` None). For a run, call `resolve.load_run`, which also resolves
    them. Raises ConfigError (one line)."""
    path = Path(path)
    merged: dict = {}
    sources = Sources()
    _compose(path, merged, sources, ())
    for text in overrides:
        key, value = parse_override(text)
        _set_dotted(merged, key, value)
        sources[key] = CLI
    cfg, _ = config_from_dict(merged, sources, str(path))
    if not cfg.name:
        cfg.name = path.stem
    return cfg, sources


def validate(cfg: RunConfig, sources: Sources, run_file: str) -> None:
    """Cross-key checks that need no method (`resolve.check_methods` does the rest)."""

    def fail(key: str, message: str) -> None:
        raise ConfigError(f"{sources.of(key, run_file)}: {key}: {message}")

    t = cfg.train
    if (t.steps > 0) == (t.tokens > 0):
        if t.steps > 0:
            fail(
                "train.tokens",
                f"train.steps={t.steps} and train.tokens={t.tokens} are both set; set exactly one",
            )
        fail("train.steps", "set exactly one of train.steps and train.tokens (both are 0)")
    for key, value, low in [
        ("train.steps", t.steps, 0),
        ("train.tokens", t.tokens, 0),
        ("train.stop_at", t.stop_at, 0),
        ("train.warmup_steps", t.warmup_steps, 0),
        ("train.batch_size", t.batch_size, 1),
        ("train.grad_accum", t.grad_accum, 1),
        ("model.seq_len", cfg.model.seq_len, 2),
        ("eval.every", cfg.eval.every, 0),
        ("eval.max_tokens", cfg.eval.max_tokens, 0),
        ("checkpoint.every", cfg.checkpoint.every, 0),
        ("checkpoint.keep_last", cfg.checkpoint.keep_last, 1),
        ("logging.every", cfg.logging.every, 1),
        ("data.val_tokens", cfg.data.val_tokens, 0),
        ("data.vocab_size", cfg.data.vocab_size, 0),
    ]:
        if value < low:
            fail(key, f"{value} is below the minimum {low}")
    for key, value in [
        ("model.hidden_size", cfg.model.hidden_size),
        ("model.intermediate_size", cfg.model.intermediate_size),
        ("model.num_layers", cfg.model.num_layers),
        ("model.num_heads", cfg.model.num_heads),
    ]:
        if value < 0:
            fail(key, f"{value} is negative (0 = the preset's)")
    if not 0 <= t.warmup_ratio < 1:
        fail("train.warmup_ratio", f"{t.warmup_ratio} is outside [0, 1)")
    if not 0 <= t.min_lr_ratio <= 1:
        fail("train.min_lr_ratio", f"{t.min_lr_ratio} is outside [0, 1]")
    if t.lr <= 0:
        fail("train.lr", f"{t.lr} must be positive")
    if t.lr_other < 0:
        fail("train.lr_other", f"{t.lr_other} must be positive (0 = train.lr)")
    if t.clip_grad_norm < 0:
        fail("train.clip_grad_norm", f"{t.clip_grad_norm} must be >= 0 (0 = off)")
    if t.steps and t.warmup_steps >= t.steps:
        fail("train.warmup_steps", f"{t.warmup_steps} is not below train.steps={t.steps}")
    if cfg.memory.cap_gib < 0:
        fail("memory.cap_gib", f"{cfg.memory.cap_gib} must be >= 0 (0 = no cap)")
    if cfg.data.vocab_size and cfg.data.tokenizer != "bpe":
        fail(
            "data.vocab_size",
            f"{cfg.data.vocab_size} applies only to data.tokenizer=bpe, not {cfg.data.tokenizer!r}",
        )
    if not cfg.weights.target:
        fail("weights.target", "is empty; name at least one Linear (e.g. q_proj)")
    for name in cfg.weights.target:
        if name not in LINEAR_NAMES:
            fail(
                "weights.target",
                f"{name!r} is not one of {', '.join(LINEAR_NAMES)}{suggest(name, list(LINEAR_NAMES))}",
            )
    b1, b2 = cfg.optim.betas
    if not (0 <= b1 < 1 and 0 <= b2 < 1):
        fail("optim.betas", f"{list(cfg.optim.betas)} must lie in [0, 1)")
    if cfg.optim.eps <= 0:
        fail("optim.eps", f"{cfg.optim.eps} must be positive")
    if cfg.optim.weight_decay < 0:
        fail("optim.weight_decay", f"{cfg.optim.weight_decay} must be >= 0")
    if cfg.optim.per_layer_accumulation == "projected" and not cfg.optim.per_layer:
        fail(
            "optim.per_layer_accumulation",
            "projected applies to optim.per_layer=true only (the whole-model step sums full "
            "gradients); set optim.per_layer=true or leave it full",
        )
    if cfg.optim.embeddings_8bit and cfg.optim.name != "adamw8bit":
        fail(
            "optim.embeddings_8bit",
            f"applies to optim.name=adamw8bit only, not {cfg.optim.name!r}",
        )
    if cfg.optim.per_layer and t.clip_grad_norm > 0:
        fail(
            "train.clip_grad_norm",
            f"{t.clip_grad_norm} with optim.per_layer=true: each tensor steps inside backward, "
            "before the global norm is known; set train.clip_grad_norm=0",
        )


# ---------------------------------------------------------------------------------------------
# Writing: the resolved config, with method keys flattened back into their section.


def to_dict(obj: Any) -> Any:
    """Plain data of a config; a method section's keys sit beside its `name` (the resolved
    Config's fields, every default included, or the parsed options before resolving)."""
    if dataclasses.is_dataclass(obj):
        out = {}
        for f in dataclasses.fields(obj):
            if isinstance(obj, MethodSection) and f.name in SECTION_FIELDS:
                continue
            out[f.name] = to_dict(getattr(obj, f.name))
        if isinstance(obj, MethodSection):
            out.update(to_dict(obj.method) if obj.method is not None else obj.options)
        return out
    if isinstance(obj, tuple | list):
        return [to_dict(v) for v in obj]
    return obj


def dump_yaml(cfg: RunConfig) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    """{'a': {'b': 1}} -> {'a.b': 1}."""
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def field_docs(cls: type = RunConfig, prefix: str = "") -> list[tuple[str, Any, str]]:
    """(dotted key, default, help) for every field of `cls` (method sections: their own fields
    only; `resolve.method_field_docs` gives each method's keys): the README's reference."""
    rows = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if issubclass(cls, MethodSection) and f.name in SECTION_FIELDS:
            continue
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            rows += field_docs(tp, f"{prefix}{f.name}.")
        else:
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            rows.append((prefix + f.name, to_dict(default), f.metadata.get("help", "")))
    return rows
