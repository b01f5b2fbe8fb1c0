"""What a run resumes from, and whether the config still describes the same math."""

from __future__ import annotations

import logging
from pathlib import Path

import yaml

from lowrank_train.checkpoint import Checkpoint, find_latest, load_checkpoint
from lowrank_train.config import RunConfig, flatten, to_dict
from lowrank_train.errors import CheckpointError
from lowrank_train.precision import Precision

log = logging.getLogger(__name__)

# Keys that do not alter the math of the steps already taken. steps/tokens extend or shorten
# the run: the schedule is recomputed for the new length, so the lr moves (the run says so).
RESUMABLE_PREFIXES = (
    "train.stop_at",
    "train.steps",
    "train.tokens",
    "eval.",
    "logging.",
    "checkpoint.",
    "memory.",
    "out_dir",
    "name",
    "data.cache_dir",
    "data.cache",
)
# Compared by their resolved values (the checkpoint's `precision` record), not as written.
PRECISION_KEYS = ("model.autocast", "model.dtype")


def resolve_resume(resume: str, checkpoint_dir: Path) -> Checkpoint | None:
    """`latest`: the newest checkpoint that verifies (None when there is none yet); else a directory."""
    if resume == "latest":
        path, skipped = find_latest(checkpoint_dir)
        for bad, reason in skipped:
            log.warning("skipping damaged checkpoint %s: %s", bad, reason)
        if path is None:
            log.info(
                "--resume latest: no checkpoint in %s yet; starting from step 0", checkpoint_dir
            )
            return None
        return load_checkpoint(path)
    path = Path(resume)
    if not path.is_dir():
        raise CheckpointError(f"--resume {resume}: no such checkpoint directory")
    return load_checkpoint(path)


def check_resumable(
    checkpoint: Checkpoint, cfg: RunConfig, world_size: int, precision: Precision
) -> None:
    """Refuse, in one line naming the keys, a config that changes the math of the steps taken.

    Precision is compared as resolved, not as written: `model.autocast: auto` may resolve
    differently on another machine (bf16 where the CPU has native bf16 matmul, fp32 elsewhere),
    and an explicit value that reproduces the saved resolution continues the same math.
    """
    saved = flatten(yaml.safe_load(checkpoint.config_yaml))
    now = flatten(to_dict(cfg))
    saved_precision = checkpoint.trainer.get("precision")  # absent before it was recorded
    compared_as_written = RESUMABLE_PREFIXES + (PRECISION_KEYS if saved_precision else ())
    changed = sorted(
        k
        for k in saved.keys() | now.keys()
        if saved.get(k) != now.get(k) and not k.startswith(compared_as_written)
    )
    if saved_precision and saved_precision != precision.record():
        was, now_is = saved_precision, precision.record()
        raise CheckpointError(
            f"{checkpoint.path}: cannot resume: it trained with weights {was['dtype']}, autocast "
            f"{was['autocast']}; here they resolve to {now_is['dtype']}, {now_is['autocast']} "
            f"({precision.reason}); continue it with model.autocast={was['autocast']}"
            + (f" model.dtype={was['dtype']}" if was["dtype"] != now_is["dtype"] else "")
        )
    if changed:
        detail = ", ".join(f"{k} {saved.get(k)!r} -> {now.get(k)!r}" for k in changed)
        raise CheckpointError(
            f"{checkpoint.path}: cannot resume: the config changes the math ({detail})"
        )
    if checkpoint.trainer["world_size"] != world_size:
        raise CheckpointError(
            f"{checkpoint.path}: saved with {checkpoint.trainer['world_size']} processes, "
            f"resumed with {world_size}: the global batch would change"
        )
    for key in ("train.steps", "train.tokens"):
        if saved.get(key) != now.get(key):
            log.warning(
                "%s changed %s -> %s: the lr schedule is recomputed for the new length, so the lr moves",
                key,
                saved.get(key),
                now.get(key),
            )
