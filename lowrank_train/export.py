"""`lowrank-train export`: a run or checkpoint directory -> a dense HF LlamaForCausalLM + tokenizer."""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer

from lowrank_train.checkpoint import (
    CONFIG_FILE,
    MANIFEST_FILE,
    TOKENIZER_FILE,
    find_latest,
    load_checkpoint,
)
from lowrank_train.data import eos_id
from lowrank_train.errors import CheckpointError
from lowrank_train.models import build_model, export_dense
from lowrank_train.resolve import load_run


def checkpoint_of(source: Path) -> Path:
    """A checkpoint directory as given, or a run directory's newest valid checkpoint."""
    if (source / MANIFEST_FILE).exists():
        return source
    root = source / "checkpoints"
    path, _ = find_latest(root)
    if path is None:
        raise CheckpointError(
            f"{source}: neither a checkpoint nor a run directory with a valid checkpoint in {root}"
        )
    return path


def export_checkpoint(source: Path, out_dir: Path) -> Path:
    """Rebuild the run's model from its checkpoint and write it as a plain dense HF model."""
    path = checkpoint_of(source)
    checkpoint = load_checkpoint(path)
    cfg, _ = load_run(path / CONFIG_FILE)
    tokenizer_file = path / TOKENIZER_FILE
    tokenizer = Tokenizer.from_file(str(tokenizer_file))
    # A structural (meta) build takes the checkpoint's tensors as they are: no init is drawn
    # only to be overwritten, and the export keeps the dtype the run trained in.
    model = build_model(cfg, tokenizer.get_vocab_size(), torch.device("meta"))
    model.load_state_dict(checkpoint.model, assign=True)
    eos = tokenizer.id_to_token(eos_id(tokenizer, str(tokenizer_file)))
    export_dense(model, tokenizer_file, eos, out_dir)
    return out_dir
