"""The memory planner: whether a run fits, before anything is allocated (DESIGN.md, "Memory
planner").

The run is built on the meta device by the same builder as `train` (`trainer.build_run`), in
the storage dtype the target device resolves to, and every component is a sum of per-tensor
formulas: weights and quantization scales from the layers' `stored_bytes()`, gradients from the
trainable tensors and the writers' side buffers, optimizer state from each inner optimizer's
dtype rules and each projector's `state_bytes`, activations from the LLaMA block's formula
(`activations`: eager mode, or the saved set of inductor's partition under `train.compile`),
and the temporaries of the loss, the optimizer step and a refresh.
Total = the largest phase (forward, backward, optimizer step, refresh, a merge) + the allocator's slack
+ the CUDA context. When it does not fit, each suggestion is the planner re-run with one change,
and, where none fits alone, with the changes together.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from itertools import chain
from pathlib import Path

import torch
from torch import nn

from lowrank_train.config import RunConfig
from lowrank_train.errors import ConfigError
from lowrank_train.optim.projected import ProjectedOptimizer
from lowrank_train.parameterizations import ParameterizedLinear
from lowrank_train.precision import Precision, resolve_precision
from lowrank_train.projectors import PROJECTORS
from lowrank_train.projectors.base import LowRankAdam
from lowrank_train.projectors.galore import REFRESH_WORKSPACE_BYTES, SVDProjector

GIB = 2**30
FP32 = 4
# Provenance of the constants; the integrator re-calibrates them on the GPU (`lowrank-train
# estimate` beside a run's measured peak_gib).
# CUDA: the caching allocator's reserve over the live bytes, a base plus a fraction of the peak
# phase, fitted to the H200 rows of 2026-12-01 (max_memory_reserved - max_memory_allocated:
# 0.23-0.37 GiB at 350m, 0.64-1.25 at 1b, 0.44-0.75 at 7b and 13b; benchmarks/replan.py)
ALLOCATOR_SLACK_BASE = int(0.25 * GIB)
ALLOCATOR_SLACK_FRACTION = 0.04
CUDA_CONTEXT_BYTES = int(
    0.5 * GIB
)  # the H200's measured 0.51 GiB; MemoryMonitor reads the real one
CPU_RUNTIME_BYTES = int(0.4 * GIB)  # CPU: max RSS of Python with lowrank_train and torch imported
EXTRA_TOKENS = 7  # token count of the probe forward of one parameterized layer (see layer_extra)


@dataclass
class Plan:
    """Bytes per component (each at its largest) and per phase, and the verdict against the cap.
    A phase is what is live at its peak: the resident tensors (weights, scales, optimizer and
    projector state) plus what that phase holds."""

    device: str
    cap_gib: float
    components: dict[str, int]
    phases: dict[str, int]
    slack_bytes: int
    activation_mode: str = "eager"
    suggestions: list[str] = field(default_factory=list)

    @property
    def total_bytes(self) -> int:
        return max(self.phases.values()) + self.slack_bytes + self.components["cuda_context"]

    @property
    def total_gib(self) -> float:
        return self.total_bytes / GIB

    @property
    def fits(self) -> bool:
        return self.cap_gib <= 0 or self.total_bytes <= self.cap_gib * GIB

    @property
    def peak_phase(self) -> str:
        return max(self.phases, key=self.phases.__getitem__)

    def to_json(self, config: str) -> dict:
        return {
            "config": config,
            "cap_gib": self.cap_gib,
            "device": self.device,
            "components": self.components,
            "phases": self.phases,
            "peak_phase": self.peak_phase,
            "slack_bytes": self.slack_bytes,
            "total_bytes": self.total_bytes,
            "total_gib": round(self.total_gib, 3),
            "fits": self.fits,
            "activations": self.activation_mode,
            "suggestions": self.suggestions,
        }

    def summary(self) -> str:
        """One line: the total, the verdict, the peak phase and the components in GiB."""
        if self.cap_gib <= 0:
            verdict = "no cap"
        else:
            verdict = f"{'fits' if self.fits else 'above'} the {self.cap_gib:g} GiB cap"
        parts = ", ".join(f"{k} {v / GIB:.2f}" for k, v in self.components.items() if v)
        return (
            f"planned {self.total_gib:.2f} GiB on {self.device} ({verdict}; peak in "
            f"{self.peak_phase}; GiB: {parts}; slack {self.slack_bytes / GIB:.2f})"
        )

    def table(self) -> str:
        rows = [f"{'component':<18}{'GiB':>10}"]
        rows += [f"{k:<18}{v / GIB:>10.3f}" for k, v in self.components.items()]
        rows += ["", f"{'phase':<18}{'GiB':>10}"]
        rows += [f"{k:<18}{v / GIB:>10.3f}" for k, v in self.phases.items()]
        rows += [f"{'slack':<18}{self.slack_bytes / GIB:>10.3f}", "", self.summary()]
        rows += [f"activations planned {self.activation_mode}"]
        return "\n".join(rows + [f"suggestion: {s}" for s in self.suggestions])


def tensor_bytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def stored_bytes(model: nn.Module) -> tuple[int, int]:
    """(weights, quantization scales): every parameter and buffer outside the parameterized
    layers, plus each layer's `stored_bytes()`, where a floating-point buffer of a layer is a
    quantization scale and everything else (codes, factors, indices) a weight."""
    layers = [m for m in model.modules() if isinstance(m, ParameterizedLinear)]
    inside = {id(t) for m in layers for t in chain(m.parameters(), m.buffers())}
    weights = sum(
        tensor_bytes(t) for t in chain(model.parameters(), model.buffers()) if id(t) not in inside
    )
    scales = 0
    for layer in layers:
        buffers = dict(layer.named_buffers(recurse=False))
        for name, nbytes in layer.stored_bytes().items():
            if name in buffers and buffers[name].is_floating_point():
                scales += nbytes
            else:
                weights += nbytes
    return weights, scales


def inner_optimizers(optimizer: torch.optim.Optimizer) -> dict[str, torch.optim.Optimizer]:
    """The MultiOptimizer's inner optimizers (through a per-layer wrapper, which holds one)."""
    multi = optimizer if hasattr(optimizer, "optimizers") else optimizer.optimizer
    return multi.optimizers


def state_bytes(opt: torch.optim.Optimizer) -> tuple[int, int]:
    """(inner-optimizer state, projected state) of one inner optimizer, by its dtype rules:
    ours by its projector's `state_bytes` (the shape, optim.state_dtype, the gradient's element
    size); torch AdamW: 2 moments in the parameter's dtype + a 0-d fp32 step per tensor;
    bitsandbytes: 2 uint8 moments + an fp32 absmax per 256 values (+ its 2 shared 256-entry fp32
    maps), or 2 fp32 moments at 32 bits and below `min_8bit_size`."""
    if isinstance(opt, ProjectedOptimizer):
        writers = getattr(opt, "writers", {})
        total = 0
        for g in opt.param_groups:
            for p in g["params"]:
                grad = writers[p].grad if p in writers else p  # the basis is in G's dtype
                total += opt.projector.state_bytes(
                    tuple(p.shape), g["state_dtype"], grad.element_size()
                )
        return 0, total
    if type(opt).__module__.startswith("bitsandbytes"):
        total, eight_bit = 0, False
        for gi, g in enumerate(opt.param_groups):
            for pi, p in enumerate(g["params"]):
                config, n = opt.get_config(gi, pi, g), p.numel()
                if config["optim_bits"] == 8 and n >= config["min_8bit_size"]:
                    total += 2 * n + 2 * FP32 * -(-n // 256)
                    eight_bit = True
                else:
                    total += 2 * FP32 * n
        return total + (2 * 256 * FP32 if eight_bit else 0), 0
    if isinstance(opt, torch.optim.Adam | torch.optim.AdamW):
        return sum(2 * tensor_bytes(p) + FP32 for g in opt.param_groups for p in g["params"]), 0
    raise TypeError(f"the planner has no state formula for {type(opt).__name__}")


def side_buffer_bytes(optimizer: torch.optim.Optimizer) -> int:
    """The writers' side-buffer gradients allocated at once: all of them, or, per layer with
    grad_accum 1, the per-layer wrapper's peak (the top layer's and two more layers')."""
    if hasattr(optimizer, "side_buffer_bytes"):
        return optimizer.side_buffer_bytes()
    return sum(
        tensor_bytes(w.grad)
        for opt in inner_optimizers(optimizer).values()
        for w in getattr(opt, "writers", {}).values()
    )


# -- activations ---------------------------------------------------------------------------------
# Saved for backward by one eager forward of HF's LlamaDecoderLayer (transformers 5.x, SDPA with
# a causal mask and no padding), derived from the tensors torch.autograd.graph.saved_tensors_hooks
# sees, with T tokens, hidden h, intermediate i, nh heads, w the storage dtype's bytes and a the
# compute dtype's (bf16 under autocast). Attention is the flash kernel on CUDA and torch's flash
# CPU kernel on CPU (torch 2.13 picks it for an unmasked causal call): both save q, k, v and the
# output plus an fp32 logsumexp (T x nh), never an s x s matrix, so one formula serves both.
#   RMSNorm:    4Th (its fp32 input) + 4T (rsqrt) + w Th (normalised x) + w Th (its output,
#               shared by the Linears that read it; under autocast each Linear keeps its own
#               cast of it instead: a Th for each of q, k, v, gate and up)
#   attention:  4 a Th (q, k, v, output) + 4 T nh
#   MLP:        4 a Ti (gate, SiLU(gate), up, their product)
#   autocast:   the bf16 copy of every matmul weight (2-D parameters but the input embedding)
#   a parameterized layer's own intermediates (e.g. the T x r of W = B A), by layer_extra
# Model: token ids (a view of the loader's b x (s + 1) int64 block) and labels (8T), the loss, cos/sin (2 s hd w), the final RMSNorm, and the
# loss's fp32 log-softmax (4 T V). With gradient checkpointing a layer keeps only its input
# (w Th) and recomputes the rest in its backward.
AUTOCAST_CASTS = 5  # Linears reading a norm's output: q, k, v (input norm), gate, up (post-attn)
# Compiled (`train.compile`, no autocast): the forward outputs that inductor's partitioner
# (min-cut rematerialization) keeps for backward, read from the partitioned graph on the CPU,
# all in the storage dtype but the fp32 rsqrt and logsumexp. Per layer: its input, both norms'
# outputs, q and k after rotary, v, the attention output (one storage for SDPA and o_proj),
# one T x h between o_proj and the residual add (o_proj's output or the sum), gate, up and
# their SiLU product (8 T x h, 3 T x i), two rsqrt and the logsumexp. The norms' fp32 inputs
# and the SiLU are recomputed. Model: ids, labels, the final norm's input, rsqrt and output,
# one fp32 rotary table (s x hd), the b x 1 x s x s causal mask (traced, HF materialises it)
# and the fp32 log-softmax. Gradient checkpointing keeps each layer's input either way; its
# compiled head is not derived (the eager formula plans it).
COMPILED_LAYER_TH = 8
COMPILED_LAYER_TI = 3


@dataclass(frozen=True)
class Activations:
    layers: list[int]  # saved by each decoder layer (its input only, under checkpointing)
    layer_full: list[int]  # each layer's full saved set (its recompute under checkpointing)
    model: int  # ids, labels, rotary tables, final norm, log-softmax
    loss_temp: int  # the loss's transients beside what it saves
    mode: str  # which formula planned them (ActivationMode.describe)

    @property
    def total(self) -> int:
        return sum(self.layers) + self.model


def norm_bytes(tokens: int, hidden: int, w: int, autocast: bool) -> int:
    return FP32 * tokens * hidden + FP32 * tokens + w * tokens * hidden * (1 if autocast else 2)


def layer_extra(layer: ParameterizedLinear, cache: dict) -> int:
    """Elements per token that one parameterized layer saves beyond its input (0 for dense), by
    a probe forward of the meta-built layer: saved tensors shaped (1, EXTRA_TOKENS, k) or
    (EXTRA_TOKENS, k), other than its input (or the input's casts) and its own tensors."""
    key = (type(layer), layer.in_features, layer.out_features, repr(layer))
    if key not in cache:
        x = torch.zeros(1, EXTRA_TOKENS, layer.in_features, device="meta", requires_grad=True)
        own = {id(t) for t in chain(layer.parameters(), layer.buffers())}
        seen: dict[int, int] = {}

        def pack(t: torch.Tensor) -> torch.Tensor:
            token_shaped = tuple(t.shape[:-1]) in ((1, EXTRA_TOKENS), (EXTRA_TOKENS,))
            if token_shaped and id(t) not in own and t.shape[-1] != layer.in_features:
                seen[id(t)] = t.shape[-1]
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            layer(x)
        cache[key] = sum(seen.values())
    return cache[key]


def activations(model: nn.Module, cfg: RunConfig, precision: Precision, batch: int) -> Activations:
    hf = model.config
    s = cfg.model.seq_len
    t, h, i, nh = batch * s, hf.hidden_size, hf.intermediate_size, hf.num_attention_heads
    w = precision.dtype.itemsize
    autocast = precision.autocast is not None
    a = precision.autocast.itemsize if autocast else w
    mode = activation_mode(cfg, precision, model)
    cache: dict = {}
    full = []
    for layer in model.model.layers:
        if mode.layers_compiled:
            bytes_ = COMPILED_LAYER_TH * w * t * h + COMPILED_LAYER_TI * w * t * i
            bytes_ += 2 * FP32 * t + FP32 * t * nh
        else:
            bytes_ = 2 * norm_bytes(t, h, w, autocast) + 4 * a * t * h + FP32 * t * nh
            bytes_ += 4 * a * t * i
        if autocast:
            bytes_ += AUTOCAST_CASTS * a * t * h
            bytes_ += sum(a * p.numel() for p in layer.parameters() if p.ndim == 2)
        extra = [
            layer_extra(m, cache) for m in layer.modules() if isinstance(m, ParameterizedLinear)
        ]
        full.append(bytes_ + a * t * sum(extra))
    checkpointed = cfg.model.gradient_checkpointing
    layers = [w * t * h] * len(full) if checkpointed else full
    head = model.get_output_embeddings().weight
    ids = 8 * batch * (s + 1) + 8 * t  # inputs: a view of the (b, s + 1) block; labels: a copy
    if mode.head_compiled:
        other = ids + FP32 + 2 * w * t * h + FP32 * t + FP32 * t * hf.vocab_size
        other += FP32 * s * (h // nh) + w * batch * s * s
    else:
        other = ids + FP32 + norm_bytes(t, h, w, autocast) + FP32 * t * hf.vocab_size
        if not checkpointed:
            other += 2 * s * (h // nh) * w
    if autocast:
        other += a * t * h + a * head.numel()
    # the loss's transients: eager, the fp32 copy of the logits and a second fp32 T x V (its
    # log-softmax or, at the start of backward, its gradient); compiled, only the logits in
    # the storage dtype beside the saved fp32 log-softmax (inductor fuses the rest)
    logits = w * t * hf.vocab_size if mode.head_compiled else 2 * FP32 * t * hf.vocab_size
    return Activations(layers, full, other, logits, mode.describe())


@dataclass(frozen=True)
class ActivationMode:
    """Which formula plans which part: `train.compile` compiles the whole model and its loss,
    or, with `optim.per_layer`, each decoder layer alone (the head and loss stay eager). Under
    autocast the compiled partition is not derived, nor the compiled head under gradient
    checkpointing: the eager formula plans those, and a run whose first step runs eagerly
    (`steps_uncompiled`, LoQT's capture steps with `capture_eager`): that step is its peak."""

    layers_compiled: bool
    head_compiled: bool

    def describe(self) -> str:
        if self.layers_compiled and self.head_compiled:
            return "compiled (inductor's saved set)"
        if self.layers_compiled:
            return "decoder layers compiled, head and loss eager"
        return "eager"


def activation_mode(cfg: RunConfig, precision: Precision, model: nn.Module) -> ActivationMode:
    eager_steps = any(
        isinstance(m, ParameterizedLinear) and m.steps_uncompiled() for m in model.modules()
    )
    compiled = cfg.train.compile and precision.autocast is None and not eager_steps
    head = compiled and not cfg.optim.per_layer and not cfg.model.gradient_checkpointing
    return ActivationMode(compiled, head)


# -- phases ----------------------------------------------------------------------------------------


def numel_of_largest(tensors) -> int:
    return max((t.numel() for t in tensors), default=0)


def projected_tensors(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    """The tensors lowrank-train's own Adam steps one at a time (torch's fused AdamW and
    bitsandbytes' 8-bit step update in place, without full-shape temporaries)."""
    return [
        p
        for opt in inner_optimizers(optimizer).values()
        if isinstance(opt, ProjectedOptimizer)
        for g in opt.param_groups
        for p in g["params"]
    ]


def run_temporaries(optimizer: torch.optim.Optimizer) -> int:
    """The largest batched run any of our projected optimizers steps (its projector's
    `run_temporary_bytes` over its tensors' shapes, at their gradients' dtype)."""
    out = 0
    for opt in inner_optimizers(optimizer).values():
        if isinstance(opt, ProjectedOptimizer):
            grads = [  # a writer's gradient is its side buffer (the stored tensor is codes)
                opt.writers[p].grad if p in opt.writers else p
                for g in opt.param_groups
                for p in g["params"]
            ]
            shapes = [tuple(t.shape) for t in grads]
            dtype = grads[0].dtype if grads else torch.float32
            out = max(out, opt.projector.run_temporary_bytes(shapes, dtype))
    return out


def refresh_workspace(optimizer: torch.optim.Optimizer, budget: int, per_layer: bool) -> int:
    """The largest allocation of a refresh beyond the gradients: an SVD projector's largest
    batched finder call (`SVDProjector.refresh_chunk` matrices of one shape within `budget`,
    `refresh_call_bytes`, cold or warm; one matrix per call when each tensor steps in
    its own hook), or the largest new basis of a projector that refreshes one tensor at a time."""
    largest = 0
    for opt in inner_optimizers(optimizer).values():
        projector = getattr(opt, "projector", None)
        if not isinstance(projector, LowRankAdam):
            continue
        shapes: dict[tuple, int] = {}
        for g in opt.param_groups:
            for p in g["params"]:
                grad = opt.writers[p].grad if p in opt.writers else p  # a writer's: its buffer
                key = (tuple(grad.shape), grad.dtype)
                shapes[key] = 1 if per_layer else shapes.get(key, 0) + 1
        for (shape, dtype), count in shapes.items():
            if not isinstance(projector, SVDProjector):
                largest = max(largest, projector.held_basis_bytes(shape, dtype))
                continue
            for warm in (False, True):
                chunk = projector.refresh_chunk(shape, dtype, warm, count, budget)
                largest = max(largest, projector.refresh_call_bytes(shape, dtype, warm, chunk))
    return largest


def plan_built(model, optimizer, cfg: RunConfig, precision: Precision, device: str) -> Plan:
    """The plan of a built (meta) run: its components, then its phases."""
    weights, scales = stored_bytes(model)
    states = [state_bytes(o) for o in inner_optimizers(optimizer).values()]
    inner, projected = sum(s[0] for s in states), sum(s[1] for s in states)
    side = side_buffer_bytes(optimizer)
    resident = weights + scales + inner + projected + side
    per_layer = getattr(cfg.optim, "per_layer", False)
    trainable = [p for p in model.parameters() if p.requires_grad]
    every_grad = sum(tensor_bytes(p) for p in trainable)
    accumulating = cfg.train.grad_accum > 1
    # per-layer: a tensor's gradient is consumed by its hook and freed at once, except while
    # accumulating: every full gradient then lives until the last micro-batch, in both modes
    one_at_a_time = per_layer and not accumulating
    grads = max((tensor_bytes(p) for p in trainable), default=0) if one_at_a_time else every_grad
    held = every_grad if accumulating else 0  # across micro-batches
    summed = [optimizer.params[i] for i in getattr(optimizer, "projected", ())]
    if accumulating and summed:  # optim.per_layer_accumulation: projected
        # each summed tensor holds an fp32 D x r sum between micro-batches, and one full
        # gradient is in flight at a time in its hook
        rank = cfg.optim.projector.method.rank
        low = sum(FP32 * max(p.shape) * rank for p in summed)
        held = every_grad - sum(tensor_bytes(p) for p in summed) + low
        grads = held + max(tensor_bytes(p) for p in summed)
    acts = activations(model, cfg, precision, cfg.train.batch_size)
    loss_temp = acts.loss_temp
    # our step forms one full-shape fp32 direction and one more fp32 tensor of that shape
    # (Adam's denominator, a dequantized weight), one tensor at a time, or a batched run's
    # temporaries (`Projector.runs`: at most BATCH_RUN_BYTES, or one tensor's share)
    step_temp = max(
        2 * FP32 * numel_of_largest(projected_tensors(optimizer)), run_temporaries(optimizer)
    )
    # backward, layer by layer from the top: the gradients so far beside the activations left
    layer_grads = [
        0 if per_layer else sum(tensor_bytes(p) for p in layer.parameters() if p.requires_grad)
        for layer in model.model.layers
    ]
    so_far, walk = grads - sum(layer_grads), 0
    for k in reversed(range(len(acts.layers))):
        so_far += layer_grads[k]
        recompute = acts.layer_full[k] if cfg.model.gradient_checkpointing else 0
        walk = max(walk, so_far + sum(acts.layers[: k + 1]) + recompute)
    during_backward = acts.total if per_layer else 0  # per-layer steps run inside backward
    # a layer's own transient (a dequantized W) exists inside its op, before the loss's
    transient = max(
        (
            m.transient_bytes(padded=device == "cuda")  # gemm pads on CUDA
            for m in model.modules()
            if isinstance(m, ParameterizedLinear)
        ),
        default=0,
    )
    # a capture step (LoQT's merge steps) holds every layer's captured G through its forward,
    # backward and the merges after it, which run one layer at a time
    layers = [m for m in model.modules() if isinstance(m, ParameterizedLinear)]
    captured = sum(m.step_buffer_bytes() for m in layers)
    merge = max((m.merge_workspace_bytes() for m in layers), default=0)
    phases = {
        "forward": resident + held + captured + acts.total + max(loss_temp, transient),
        "backward": resident + captured + max(held + acts.total + loss_temp, walk + transient),
    }
    # a refresh's finder calls take at most what the backward pass freed on CUDA
    # (`refresh_budget`), and the fixed cap elsewhere
    budget = REFRESH_WORKSPACE_BYTES
    if device == "cuda":
        freed = max(phases.values()) - (resident + grads + during_backward)
        budget = max(0, min(budget, freed))
    refresh = refresh_workspace(optimizer, budget, per_layer)
    phases |= {
        "optimizer_step": resident + grads + step_temp + during_backward,
        "refresh": resident + grads + refresh + during_backward,
    }
    if captured:
        phases["merge"] = resident + captured + merge
    components = {
        "weights": weights,
        "gradients": grads + side,
        "optimizer_states": inner,
        "projector": projected,
        "quant_scales": scales,
        "activations": acts.total,
        # a merge step's captured G is temporary: it exists only on the steps that capture
        "temporary": max(loss_temp, step_temp, refresh, transient, captured + merge),
        "cuda_context": CUDA_CONTEXT_BYTES if device == "cuda" else 0,
    }
    if device == "cuda":
        slack = ALLOCATOR_SLACK_BASE + int(ALLOCATOR_SLACK_FRACTION * max(phases.values()))
    else:
        slack = CPU_RUNTIME_BYTES
    return Plan(device, cfg.memory.cap_gib, components, phases, slack, acts.mode)


def planned_vocab_size(cfg: RunConfig) -> int:
    """The vocabulary a run will have, without building its data: a token cache's (data.cache,
    or the corpus's cache when it is built), a tokenizer file's, GPT-2's, or the BPE size."""
    from tokenizers import Tokenizer

    from lowrank_train.data import _bpe_vocab, cache_name

    d = cfg.data
    cache = Path(d.cache) if d.cache else Path(d.cache_dir) / cache_name(d, cfg.model.preset)
    if (cache / "tokenizer.json").is_file():
        return Tokenizer.from_file(str(cache / "tokenizer.json")).get_vocab_size()
    if d.tokenizer == "gpt2":
        return GPT2_VOCAB
    if d.tokenizer != "bpe":
        return Tokenizer.from_file(d.tokenizer).get_vocab_size()
    return _bpe_vocab(d, cfg.model.preset)


GPT2_VOCAB = 50257


def plan_run(
    cfg: RunConfig,
    device: torch.device | str,
    vocab_size: int | None = None,
    world_size: int = 1,
    suggest: bool = True,
) -> Plan:
    """The plan of `cfg` on `device` (cpu | cuda; the machine may be another), from a meta build
    by `trainer.build_run`. With `suggest` and a plan above the cap, the changes that would
    make it fit better, each with what the re-run planner says it saves."""
    from lowrank_train.trainer import build_run  # lazily: the trainer imports this module

    device = torch.device(device)
    precision = resolve_precision(cfg.model, device)
    vocab = vocab_size or planned_vocab_size(cfg)
    # the meta build takes the dtype the target device resolves to, not the meta device's
    dtype = str(precision.dtype).removeprefix("torch.")
    meta_cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, dtype=dtype))
    built = build_run(meta_cfg, vocab, torch.device("meta"), world_size)
    plan = plan_built(built.model, built.optimizer, cfg, precision, device.type)
    if suggest and not plan.fits:
        plan.suggestions = suggestions(cfg, device, vocab, world_size, plan)
    return plan


def candidate_changes(cfg: RunConfig) -> list[dict[str, object]]:
    """Settings that lower memory without changing what a step computes (a smaller micro-batch
    keeps the tokens per step through grad_accum), or with a documented approximation (8-bit
    moments)."""
    out: list[dict[str, object]] = []
    if not cfg.model.gradient_checkpointing:
        out.append({"model.gradient_checkpointing": True})
    if not getattr(cfg.optim, "per_layer", False):
        # per-layer stepping refuses global-norm clipping (config.validate): offer both or nothing
        clip_off = {"train.clip_grad_norm": 0.0} if cfg.train.clip_grad_norm > 0 else {}
        out.append({"optim.per_layer": True, **clip_off})
    if cfg.train.batch_size > 1:
        half = cfg.train.batch_size // 2
        accum = cfg.train.grad_accum * cfg.train.batch_size // half
        if half * accum == cfg.train.batch_size * cfg.train.grad_accum:
            out.append({"train.batch_size": half, "train.grad_accum": accum})
    projector = cfg.optim.projector.name
    if (
        getattr(cfg.optim, "per_layer", False)
        and cfg.train.grad_accum > 1
        and cfg.optim.per_layer_accumulation == "full"
        and projector != "none"
        and getattr(PROJECTORS.get(projector), "accumulates_projected", False)
    ):  # the documented deviation: the refresh reads the first micro-batch's gradient
        out.append({"optim.per_layer_accumulation": "projected"})
    if cfg.optim.name == "adamw":
        out.append({"optim.name": "adamw8bit"})
    if cfg.optim.state_dtype != "int8":
        out.append({"optim.state_dtype": "int8"})
    return out


def with_changes(cfg: RunConfig, changes: dict[str, object]) -> RunConfig:
    """A copy of cfg with dotted keys set (sections copied, never shared)."""
    cfg = dataclasses.replace(cfg)
    for dotted, value in changes.items():
        section, key = dotted.split(".")
        setattr(cfg, section, dataclasses.replace(getattr(cfg, section), **{key: value}))
    return cfg


def _checked_plan(
    cfg: RunConfig, changes: dict, device: torch.device, vocab: int, world_size: int
) -> Plan | None:
    """The plan of cfg with `changes`, or None where `load_run`'s checks or the builder refuse
    the changed run (a suggestion the user could not run is no suggestion)."""
    from lowrank_train.config import Sources, validate
    from lowrank_train.resolve import check_methods

    changed = with_changes(cfg, changes)
    try:
        validate(changed, Sources(), "suggestion")
        check_methods(changed, Sources(), "suggestion")
        return plan_run(changed, device, vocab, world_size, suggest=False)
    except ConfigError:
        return None


def _as_overrides(changes: dict) -> str:
    return " ".join(
        f"{k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in changes.items()
    )


def suggestions(
    cfg: RunConfig, device: torch.device, vocab: int, world_size: int, base: Plan
) -> list[str]:
    """Each candidate change that saves memory, re-planned, largest saving first. Where none
    fits alone, one more line: the changes taken together, largest saving first, each kept
    only if it still lowers the plan, until the run fits (or the list ends)."""
    tried = []
    for changes in candidate_changes(cfg):
        plan = _checked_plan(cfg, changes, device, vocab, world_size)
        if plan is not None:
            tried.append((base.total_bytes - plan.total_bytes, changes, plan))
    tried.sort(key=lambda t: t[0], reverse=True)
    found = [t for t in tried if t[0] > 0]
    lines = [f"{_as_overrides(c)} saves {saved / GIB:.2f} GiB" for saved, c, _ in found]
    if found and not any(plan.fits for _, _, plan in found):
        # a change that saves nothing alone can save once another has moved the peak phase
        together, best, merged = {}, base, 0
        for _, changes, _ in tried:
            plan = _checked_plan(cfg, {**together, **changes}, device, vocab, world_size)
            if plan is not None and plan.total_bytes < best.total_bytes:
                together, best, merged = {**together, **changes}, plan, merged + 1
                if best.fits:
                    break
        if merged > 1:  # one change alone is already a line above
            verdict = "fits" if best.fits else "still above"
            lines.append(
                f"together: {_as_overrides(together)} plans {best.total_bytes / GIB:.2f} GiB "
                f"({verdict} the {cfg.memory.cap_gib:g} GiB cap)"
            )
    return lines
