"""Crash-safe checkpoints: `root/step-XXXXXXXX/` with model, optimizer, trainer state and config.

A checkpoint is written into `root/.tmp-*`, every file fsynced, `manifest.json` (sha256 and size
of each file) written last, then renamed into place. A directory therefore either has a manifest
that matches its files or it is not a checkpoint, and `find_latest` can skip what a crash, a
full disk or a copy cut short left behind. Everything loads with `weights_only=True`, so the
trainer state (RNG included) holds only tensors and plain Python values.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import logging
import os
import random
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import safetensors.torch
import torch

import lowrank_train
from lowrank_train.errors import CheckpointError

log = logging.getLogger(__name__)

MODEL_FILE, OPTIMIZER_FILE, TRAINER_FILE, CONFIG_FILE, TOKENIZER_FILE = (
    "model.safetensors",
    "optimizer.pt",
    "trainer.pt",
    "config.yaml",
    "tokenizer.json",  # so a checkpoint exports and samples without the token cache
)
MANIFEST_FILE = "manifest.json"
FILES = (MODEL_FILE, OPTIMIZER_FILE, TRAINER_FILE, CONFIG_FILE, TOKENIZER_FILE)
TMP_PREFIX = ".tmp-"
_STEP_DIR = re.compile(r"^step-(\d{8,})$")


@dataclass
class Checkpoint:
    path: Path
    step: int
    model: dict[str, torch.Tensor]
    optimizer: dict
    trainer: dict
    config_yaml: str


def step_dir_name(step: int) -> str:
    return f"step-{step:08d}"


def _fsync_path(path: Path) -> None:
    """fsync a file or directory by path (a directory fsync makes its entries durable)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _tensors_for_safetensors(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """CPU, contiguous, and no two tensors sharing storage: save_file refuses aliased tensors
    (tied weights, views), so every tensor after the first on a storage is cloned."""
    out: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for name, tensor in state.items():
        t = tensor.detach().to("cpu").contiguous()
        ptr = t.untyped_storage().data_ptr()
        if t.numel() and ptr in seen:
            t = t.clone()
            ptr = t.untyped_storage().data_ptr()
        seen.add(ptr)
        out[name] = t
    return out


def _write_bytes(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _torch_save(path: Path, obj: Any) -> None:
    with open(path, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())


def _step_dirs(root: Path) -> list[tuple[int, Path]]:
    """`step-*` directories under root, newest (highest step) first."""
    if not root.is_dir():
        return []
    found = [
        (int(m.group(1)), p)
        for p in root.iterdir()
        if (m := _STEP_DIR.match(p.name)) and p.is_dir()
    ]
    return sorted(found, reverse=True)


def save_checkpoint(
    root: Path,
    step: int,
    *,
    model_state: dict[str, torch.Tensor],
    optimizer_state: dict,
    trainer_state: dict,
    config_yaml: str,
    tokenizer_json: str,
    keep_last: int,
) -> Path:
    """Write `root/step-%08d/` atomically, then prune to the newest `keep_last` valid ones.

    The directory being replaced (same step) is renamed away before the new one is renamed in,
    so a crash in between leaves the older steps, never a half-written `step-*` directory.
    """
    if keep_last < 1:
        raise ValueError(f"keep_last must be >= 1, got {keep_last}")
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    final = root / step_dir_name(step)
    tmp = Path(tempfile.mkdtemp(prefix=f"{TMP_PREFIX}{final.name}-", dir=root))
    try:
        safetensors.torch.save_file(
            _tensors_for_safetensors(model_state),
            str(tmp / MODEL_FILE),
            metadata={"format": "pt", "step": str(step)},
        )
        _fsync_path(tmp / MODEL_FILE)
        _torch_save(tmp / OPTIMIZER_FILE, optimizer_state)
        _torch_save(tmp / TRAINER_FILE, trainer_state)
        _write_bytes(tmp / CONFIG_FILE, config_yaml.encode())
        _write_bytes(tmp / TOKENIZER_FILE, tokenizer_json.encode())
        manifest = {
            "step": step,
            "versions": {
                "torch": torch.__version__,
                "transformers": _version("transformers"),
                "lowrank_train": lowrank_train.__version__,
            },
            "files": {
                name: {"sha256": _sha256(tmp / name), "size": (tmp / name).stat().st_size}
                for name in FILES
            },
        }
        _write_bytes(tmp / MANIFEST_FILE, json.dumps(manifest, indent=2).encode())
        _fsync_path(tmp)
        old = None
        if final.exists():
            old = root / f"{TMP_PREFIX}old-{final.name}-{os.getpid()}"
            os.rename(final, old)
        try:
            os.rename(tmp, final)
        except BaseException:
            if old is not None:  # put the previous checkpoint of this step back
                os.rename(old, final)
            raise
        _fsync_path(root)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("saved checkpoint %s", final)
    _prune(root, final, step, keep_last)
    return final


def _prune(root: Path, saved: Path, step: int, keep_last: int) -> None:
    """Keep `saved` and the newest `keep_last - 1` older checkpoints that verify; delete the rest
    and any stale `.tmp-*` directory. Directories with a higher step than the one just saved are
    left alone (a run resumed from an older checkpoint): deleting the checkpoint just written, or
    another run's, would be worse than a warning."""
    for tmp in root.glob(f"{TMP_PREFIX}*"):
        log.info("removing stale temporary checkpoint directory %s", tmp)
        shutil.rmtree(tmp, ignore_errors=True)
    kept = 1
    for other_step, path in _step_dirs(root):
        if other_step > step:
            log.warning(
                "checkpoint %s is newer than the one just saved (%s) and is kept; "
                "`--resume latest` would pick it",
                path,
                saved,
            )
        elif path != saved:
            # Sizes only: re-hashing every kept checkpoint at every save costs seconds per GB.
            if kept < keep_last and verify_checkpoint(path, deep=False) is None:
                kept += 1
            else:
                log.info("removing old checkpoint %s", path)
                shutil.rmtree(path, ignore_errors=True)


def verify_checkpoint(path: Path, *, deep: bool = True) -> str | None:
    """None if `path` is an intact checkpoint, else a short reason. `deep=False` checks the
    manifest and file sizes but skips the sha256 (cheap enough to run at every save)."""
    path = Path(path)
    if not path.is_dir():
        return "not a directory"
    if not (path / MANIFEST_FILE).is_file():
        return f"no {MANIFEST_FILE}"
    try:
        manifest = json.loads((path / MANIFEST_FILE).read_text())
        files = manifest["files"]
        int(manifest["step"])
    except (OSError, ValueError, KeyError, TypeError):
        return f"{MANIFEST_FILE} unreadable"
    for name in FILES:
        entry = files.get(name) if isinstance(files, dict) else None
        if not isinstance(entry, dict) or "sha256" not in entry or "size" not in entry:
            return f"{MANIFEST_FILE} does not list {name}"
        file = path / name
        if not file.is_file():
            return f"{name} missing"
        size = file.stat().st_size
        if size != entry["size"]:
            return f"{name}: size {size} != {entry['size']} in manifest"
        if deep and _sha256(file) != entry["sha256"]:
            return f"{name}: sha256 mismatch"
    return None


def find_latest(root: Path) -> tuple[Path | None, list[tuple[Path, str]]]:
    """The newest `step-*` directory under root that verifies, and (path, reason) for each newer
    one skipped. `.tmp-*` directories are never candidates."""
    skipped: list[tuple[Path, str]] = []
    for _, path in _step_dirs(Path(root)):
        reason = verify_checkpoint(path)
        if reason is None:
            return path, skipped
        log.warning("skipping checkpoint %s: %s", path, reason)
        skipped.append((path, reason))
    return None, skipped


def load_checkpoint(path: Path) -> Checkpoint:
    """Verify, then load every part on CPU with `weights_only=True` (no pickled code runs)."""
    path = Path(path)
    reason = verify_checkpoint(path)
    if reason is not None:
        raise CheckpointError(f"{path}: damaged checkpoint: {reason}")
    try:
        step = int(json.loads((path / MANIFEST_FILE).read_text())["step"])
        model = safetensors.torch.load_file(str(path / MODEL_FILE), device="cpu")
        optimizer = torch.load(path / OPTIMIZER_FILE, weights_only=True, map_location="cpu")
        trainer = torch.load(path / TRAINER_FILE, weights_only=True, map_location="cpu")
        config_yaml = (path / CONFIG_FILE).read_text()
    except Exception as exc:  # verified but unloadable: e.g. a class weights_only refuses
        first_line = (str(exc).splitlines() or [type(exc).__name__])[0]
        raise CheckpointError(f"{path}: cannot load checkpoint: {first_line}") from exc
    return Checkpoint(
        path=path,
        step=step,
        model=model,
        optimizer=optimizer,
        trainer=trainer,
        config_yaml=config_yaml,
    )


def capture_rng() -> dict[str, Any]:
    """Global RNG states of python, numpy, torch CPU and every CUDA device as tensors and plain
    numbers, because numpy's state tuple (an ndarray) does not load under `weights_only=True`."""
    py_version, py_state, py_gauss = random.getstate()
    _, np_key, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    state: dict[str, Any] = {
        "python_version": int(py_version),
        "python_state": torch.tensor(py_state, dtype=torch.int64),
        "python_gauss": None if py_gauss is None else float(py_gauss),
        "numpy_key": torch.from_numpy(np.asarray(np_key, dtype=np.int64)),
        "numpy_pos": int(np_pos),
        "numpy_has_gauss": int(np_has_gauss),
        "numpy_cached_gaussian": float(np_gauss),
        "torch_cpu": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["torch_cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict) -> None:
    """Set the global RNGs from `capture_rng()`'s dict; CUDA states are restored for as many
    devices as both the saved run and this process have (a warning says when they differ)."""
    random.setstate(
        (
            state["python_version"],
            tuple(int(x) for x in state["python_state"].tolist()),
            state["python_gauss"],
        )
    )
    np.random.set_state(
        (
            "MT19937",
            state["numpy_key"].numpy().astype(np.uint32),
            int(state["numpy_pos"]),
            int(state["numpy_has_gauss"]),
            float(state["numpy_cached_gaussian"]),
        )
    )
    torch.set_rng_state(state["torch_cpu"].to("cpu", torch.uint8))
    saved_cuda = state.get("torch_cuda") or []
    available = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if len(saved_cuda) != available:
        log.warning(
            "checkpoint has CUDA RNG states for %d device(s), this process sees %d",
            len(saved_cuda),
            available,
        )
    for index, cuda_state in enumerate(saved_cuda[:available]):
        torch.cuda.set_rng_state(cuda_state.to("cpu", torch.uint8), index)
