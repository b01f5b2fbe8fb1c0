"""LLaMA presets, built on the meta device and materialised tensor by tensor in the run's dtype.

No dense fp32 copy of the whole model ever exists: targeted Linears are converted one layer
at a time by the parameterization (`swap_linears`), and every other parameter is drawn in fp32
on the CPU from a generator seeded by (seed, its name), then cast and moved on its own.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import init_empty_weights
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from lowrank_train.config import ModelConfig, RunConfig
from lowrank_train.modules import is_norm
from lowrank_train.parameterizations import PARAMETERIZATIONS, ParameterizedLinear
from lowrank_train.parameterizations.base import swap_linears
from lowrank_train.precision import resolve_precision
from lowrank_train.seeding import generator

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Shape:
    hidden: int
    intermediate: int
    heads: int
    layers: int


# llama_20m is ours (16.9M parameters at vocab 8192); the others are the GaLore/SLTrain papers'
# shapes, whose parameter counts assume vocab 32000.
PRESETS: dict[str, Shape] = {
    "llama_20m": Shape(384, 1024, 6, 6),
    "llama_60m": Shape(512, 1376, 8, 8),
    "llama_130m": Shape(768, 2048, 12, 12),
    "llama_350m": Shape(1024, 2736, 16, 24),
    "llama_1b": Shape(2048, 5461, 32, 24),
    "llama_7b": Shape(4096, 11008, 32, 32),
    "llama_13b": Shape(5120, 13824, 40, 40),
}
INIT_STD = 0.02  # LLaMA's initializer_range


def llama_config(cfg: ModelConfig, vocab_size: int) -> LlamaConfig:
    """The HF config of a preset with the run's overrides (0 keeps the preset's value)."""
    shape = PRESETS[cfg.preset]
    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=cfg.hidden_size or shape.hidden,
        intermediate_size=cfg.intermediate_size or shape.intermediate,
        num_hidden_layers=cfg.num_layers or shape.layers,
        num_attention_heads=cfg.num_heads or shape.heads,
        max_position_embeddings=cfg.seq_len,
        tie_word_embeddings=False,
        initializer_range=INIT_STD,
        rms_norm_eps=1e-6,
        use_cache=False,
        attn_implementation="sdpa",
    )


def _init_(name: str, tensor: torch.Tensor, module: nn.Module, gen: torch.Generator) -> None:
    """LLaMA's init for a non-targeted tensor: norms 1, biases 0, matrices N(0, 0.02^2)."""
    if is_norm(module) or name.endswith("bias"):
        tensor.fill_(1.0 if not name.endswith("bias") else 0.0)
    else:
        tensor.normal_(0.0, INIT_STD, generator=gen)


def materialize_(model: nn.Module, seed: int, device: torch.device, dtype: torch.dtype) -> None:
    """Give every meta parameter real storage: drawn in fp32 on the CPU, then cast and moved.
    A meta `device` leaves the model structural (shapes and dtypes only)."""
    if device.type == "meta":
        for module in model.modules():  # parameters only: the rotary buffers stay fp32, as below
            for p_name, p in list(module.named_parameters(recurse=False)):
                setattr(module, p_name, nn.Parameter(p.to(dtype), requires_grad=p.requires_grad))
        return
    for mod_name, module in model.named_modules():
        for p_name, p in list(module.named_parameters(recurse=False)):
            if p.device.type != "meta":
                continue
            full = f"{mod_name}.{p_name}" if mod_name else p_name
            value = torch.empty(p.shape, dtype=torch.float32)
            with torch.no_grad():
                _init_(full, value, module, generator(seed, full))
            setattr(
                module,
                p_name,
                nn.Parameter(value.to(device=device, dtype=dtype), requires_grad=p.requires_grad),
            )
    model.to(device)  # the rotary buffers, built on the CPU by accelerate


def build_model(cfg: RunConfig, vocab_size: int, device: torch.device) -> LlamaForCausalLM:
    """The run's model: a LLaMA whose targeted Linears are the configured parameterization."""
    dtype = resolve_precision(cfg.model, device).dtype
    with init_empty_weights(include_buffers=False):
        model = LlamaForCausalLM(llama_config(cfg.model, vocab_size))
    parameterization = PARAMETERIZATIONS.get(cfg.weights.name)(cfg.weights.method)
    swap_linears(
        model, parameterization, cfg.weights.target, cfg.train.seed, INIT_STD, device, dtype
    )
    materialize_(model, cfg.train.seed, device, dtype)
    if cfg.model.gradient_checkpointing:
        kwargs = {"use_reentrant": False}
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.2x renamed it
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:  # the benchmark machine's transformers 5.17
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    return model


def parameter_counts(model: nn.Module) -> dict[str, int]:
    """Trainable and stored parameter counts, split as the papers report them. A quantized
    weight trained through its writer (INT8 codes) counts as one trainable weight per code."""
    emb = {
        id(p)
        for m in (model.get_input_embeddings(), model.get_output_embeddings())
        for p in m.parameters()
    }
    layers = [m for m in model.modules() if isinstance(m, ParameterizedLinear)]
    in_layers = {id(p) for m in layers for p in m.parameters()}
    params = list(model.parameters())
    written = sum(w.tensor.numel() for m in layers for w in m.writers().values())
    return {
        "total": sum(p.numel() for p in params) + written,
        "trainable": sum(p.numel() for p in params if p.requires_grad) + written,
        "embeddings": sum(p.numel() for p in params if id(p) in emb),
        "targeted_layers": sum(p.numel() for p in params if id(p) in in_layers) + written,
        "targeted_count": len(layers),
    }


def describe(model: nn.Module, cfg: RunConfig) -> str:
    c = parameter_counts(model)
    hf = model.config
    return (
        f"model {cfg.model.preset}: {c['total'] / 1e6:.2f}M parameters ({c['trainable'] / 1e6:.2f}M trainable; "
        f"embeddings+head {c['embeddings'] / 1e6:.2f}M; {c['targeted_count']} {cfg.weights.name} layers "
        f"{c['targeted_layers'] / 1e6:.2f}M) | hidden {hf.hidden_size}, intermediate {hf.intermediate_size}, "
        f"{hf.num_hidden_layers} layers, {hf.num_attention_heads} heads, vocab {hf.vocab_size}, seq {cfg.model.seq_len}"
    )


def dense_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The HF state dict of a dense LLaMA: every parameterized layer as its dense weight (and bias)."""
    state = {}
    layers = {name: m for name, m in model.named_modules() if isinstance(m, ParameterizedLinear)}
    for name, tensor in model.state_dict().items():
        if not any(name.startswith(prefix + ".") for prefix in layers):
            state[name] = tensor
    for prefix, layer in layers.items():
        with torch.no_grad():
            state[f"{prefix}.weight"] = layer.dense_weight().detach().clone()
            if getattr(layer, "bias", None) is not None:
                state[f"{prefix}.bias"] = layer.bias.detach().clone()
    return state


def export_dense(model: nn.Module, tokenizer_file: Path, eos_token: str, out_dir: Path) -> None:
    """Write a plain HF LlamaForCausalLM (safetensors) and its tokenizer that from_pretrained loads."""
    from transformers import PreTrainedTokenizerFast

    with init_empty_weights(include_buffers=False):
        dense = LlamaForCausalLM(model.config)
    dense.load_state_dict(dense_state_dict(model), assign=True, strict=True)
    dense.save_pretrained(out_dir)
    tokenizer = PreTrainedTokenizerFast(tokenizer_file=str(tokenizer_file), eos_token=eos_token)
    tokenizer.save_pretrained(out_dir)


@torch.no_grad()
def generate_samples(
    model: nn.Module, tokenizer_file: Path, prompts: list[str], max_new_tokens: int, seed: int
) -> list[str]:
    """Sampled continuations (top-k 40, temperature 0.8), reproducible for a seed."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(tokenizer_file))
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    out = []
    for i, prompt in enumerate(prompts):
        torch.manual_seed(seed + i)
        ids = torch.tensor([tokenizer.encode(prompt).ids], device=device)
        room = max(1, min(max_new_tokens, model.config.max_position_embeddings - ids.shape[1]))
        sample = model.generate(
            ids,
            max_new_tokens=room,
            do_sample=True,
            top_k=40,
            temperature=0.8,
            use_cache=True,
            pad_token_id=0,
        )
        out.append(tokenizer.decode(sample[0].tolist()))
    model.train(was_training)
    return out
