"""The training loop. It builds what the config names and steps it; it never names a method.

One step: set lr (scheduler) -> grad_accum micro-batches (forward, loss / accum, backward) ->
clip the global grad norm -> optimizer step -> scheduler step -> layers' after_step hooks ->
log / eval / save at their cadence. The loss reaches the host only at logging steps and before
a save, so the loop adds no per-step synchronisation.
"""

from __future__ import annotations

import json
import logging
import math
import signal
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from lowrank_train import checkpoint as ckpt
from lowrank_train import distributed
from lowrank_train.config import RunConfig, dump_yaml, to_dict
from lowrank_train.data import BlockLoader, TokenData, check_sizes, prepare_data, val_batches
from lowrank_train.errors import CheckpointError, NonFiniteLossError
from lowrank_train.memory import MemoryMonitor
from lowrank_train.metrics import Metrics
from lowrank_train.models import build_model, describe, resolve_dtypes
from lowrank_train.optim import build_optimizer
from lowrank_train.optim.schedule import build_scheduler, warmup_steps
from lowrank_train.parameterizations import ParameterizedLinear
from lowrank_train.resume import check_resumable, resolve_resume

log = logging.getLogger(__name__)


@dataclass
class Progress:
    step: int = 0
    tokens: int = 0
    best_val_loss: float = math.inf
    last_val_loss: float = math.nan


@dataclass
class RunResult:
    run_dir: Path
    progress: Progress
    model: nn.Module
    data: TokenData
    summary: dict = field(default_factory=dict)


class StopFlag:
    """Set by SIGTERM/SIGINT; the loop saves a checkpoint and exits 0 so the run resumes."""

    def __init__(self):
        self.signal: str | None = None
        self._previous = {}

    def __enter__(self):
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.signal is not None:  # a second signal: stop now
            raise KeyboardInterrupt
        self.signal = signal.Signals(signum).name
        log.warning("%s received: saving a checkpoint after this step, then exiting", self.signal)

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def total_steps(cfg: RunConfig, world_size: int) -> int:
    t = cfg.train
    if t.steps:
        return t.steps
    return max(1, t.tokens // (t.batch_size * t.grad_accum * world_size * cfg.model.seq_len))


def causal_lm_loss(
    model: nn.Module, inputs: torch.Tensor, labels: torch.Tensor, reduction: str = "mean"
) -> torch.Tensor:
    """Cross-entropy of next-token prediction; labels are already shifted by the loader."""
    logits = model(input_ids=inputs).logits
    return F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), reduction=reduction)


@torch.no_grad()
def evaluate(
    model: nn.Module,
    data: TokenData,
    cfg: RunConfig,
    device: torch.device,
    autocast: torch.dtype | None,
) -> float:
    """Token-weighted mean loss over the fixed held-out tokens (sum of losses / number of tokens)."""
    was_training = model.training
    model.eval()
    total, count = torch.zeros((), device=device, dtype=torch.float64), 0
    for inputs, labels in val_batches(
        data.val, cfg.model.seq_len, cfg.train.batch_size, cfg.eval.max_tokens
    ):
        inputs, labels = inputs.to(device), labels.to(device)
        with torch.autocast(
            device.type, dtype=autocast or torch.bfloat16, enabled=autocast is not None
        ):
            total += causal_lm_loss(model, inputs, labels, reduction="sum").double()
        count += labels.numel()
    model.train(was_training)
    return (total / count).item()


def train(cfg: RunConfig, resume: str | None = None) -> RunResult:
    """Run (or resume) the configured training; returns the trained model and its summary."""
    if resume is None and any(cfg.checkpoint_dir.glob("step-*")):
        raise CheckpointError(
            f"{cfg.checkpoint_dir} already holds checkpoints: continue them with --resume latest, "
            "or give the run another name or out_dir"
        )
    env = distributed.setup(cfg.train.device)
    device = env.device
    run_dir = cfg.run_dir
    if env.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(dump_yaml(cfg))
    checkpoint = resolve_resume(resume, cfg.checkpoint_dir) if resume else None
    if checkpoint is not None:  # before anything is built: a refusal costs nothing
        check_resumable(checkpoint, cfg, env.world_size)
    torch.manual_seed(cfg.train.seed)
    memory = MemoryMonitor(device, cfg.memory.cap_gib)

    data = prepare_data(cfg.data, cfg.model.preset, env.rank, env.world_size)
    check_sizes(data, cfg.model.seq_len, cfg.train.batch_size * env.world_size)
    model = build_model(cfg, data.vocab_size, device)
    dtype, autocast = resolve_dtypes(cfg.model, device)
    log.info(
        "%s | weights %s, autocast %s, device %s x%d",
        describe(model, cfg),
        dtype,
        autocast or "off",
        device,
        env.world_size,
    )
    optimizer = build_optimizer(cfg, model, device)
    steps = total_steps(cfg, env.world_size)
    warmup = warmup_steps(steps, cfg.train.warmup_ratio, cfg.train.warmup_steps)
    scheduler = build_scheduler(optimizer, steps, warmup, cfg.train.min_lr_ratio)
    loader = BlockLoader(
        data.train,
        cfg.model.seq_len,
        cfg.train.batch_size,
        cfg.train.seed,
        env.rank,
        env.world_size,
    )
    layers = [m for m in model.modules() if isinstance(m, ParameterizedLinear)]
    progress = Progress()

    if checkpoint is not None:
        model.load_state_dict(checkpoint.model)
        optimizer.load_state_dict(checkpoint.optimizer)
        state = checkpoint.trainer
        scheduler.load_state_dict(state["scheduler"])
        loader.load_state_dict(state["loader"])
        ckpt.restore_rng(state["rng"])
        progress = Progress(
            state["step"], state["tokens"], state["best_val_loss"], state["last_val_loss"]
        )
        log.info(
            "resumed from %s at step %d (%s tokens)",
            checkpoint.path,
            progress.step,
            f"{progress.tokens:,}",
        )

    tokens_per_step = (
        cfg.train.batch_size * cfg.train.grad_accum * env.world_size * cfg.model.seq_len
    )
    metrics = Metrics(run_dir, env.is_main, steps, cfg.logging, cfg.name, to_dict(cfg))
    if checkpoint is not None:
        metrics.event("resume", progress.step, path=str(checkpoint.path))
    wrapped = DistributedDataParallel(model) if env.world_size > 1 else model
    loss_fn = torch.compile(causal_lm_loss) if cfg.train.compile else causal_lm_loss
    params = [p for p in model.parameters() if p.requires_grad]
    end = min(steps, cfg.train.stop_at) if cfg.train.stop_at else steps
    tokenizer_json = data.tokenizer_path.read_text()

    def save(loss: torch.Tensor | None) -> None:
        if loss is not None and not math.isfinite(loss.item()):
            raise NonFiniteLossError(f"loss is {loss.item()} at step {progress.step}; not saving")
        if env.is_main:
            path = ckpt.save_checkpoint(
                cfg.checkpoint_dir,
                progress.step,
                model_state=model.state_dict(),
                optimizer_state=optimizer.state_dict(),
                config_yaml=dump_yaml(cfg),
                tokenizer_json=tokenizer_json,
                keep_last=cfg.checkpoint.keep_last,
                trainer_state={
                    "step": progress.step,
                    "tokens": progress.tokens,
                    "scheduler": scheduler.state_dict(),
                    "loader": loader.state_dict(),
                    "rng": ckpt.capture_rng(),
                    "world_size": env.world_size,
                    "best_val_loss": progress.best_val_loss,
                    "last_val_loss": progress.last_val_loss,
                },
            )
            metrics.event("checkpoint", progress.step, path=str(path))
        distributed.barrier()

    def run_eval() -> None:
        val = evaluate(model, data, cfg, device, autocast)
        progress.last_val_loss, progress.best_val_loss = val, min(progress.best_val_loss, val)
        metrics.eval(progress.step, progress.tokens, val)

    model.train()
    loss_sum = torch.zeros((), device=device)
    window_start, window_steps, started, first_step = (
        time.perf_counter(),
        0,
        time.perf_counter(),
        progress.step,
    )
    step_loss = None
    with StopFlag() as stop:
        while progress.step < end:
            for micro in range(cfg.train.grad_accum):
                inputs, labels = (t.to(device, non_blocking=True) for t in next(loader))
                sync = micro == cfg.train.grad_accum - 1 or env.world_size == 1
                with (
                    wrapped.no_sync() if not sync else nullcontext(),
                    torch.autocast(
                        device.type, dtype=autocast or torch.bfloat16, enabled=autocast is not None
                    ),
                ):
                    loss = loss_fn(wrapped, inputs, labels) / cfg.train.grad_accum
                loss.backward()
                step_loss = loss.detach() if micro == 0 else step_loss + loss.detach()
            log_now = (progress.step + 1) % cfg.logging.every == 0 or progress.step + 1 == end
            clip = cfg.train.clip_grad_norm or (math.inf if log_now else 0)
            grad_norm = torch.nn.utils.clip_grad_norm_(params, clip) if clip else None
            lr = optimizer.param_groups[0]["lr"]
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            scheduler.step()
            progress.step += 1
            progress.tokens += tokens_per_step
            for layer in layers:
                layer.after_step(progress.step, optimizer)
            loss_sum += step_loss
            window_steps += 1

            if log_now:
                mean_loss = (
                    loss_sum / window_steps
                ).item()  # the one host sync of a logging window
                if not math.isfinite(mean_loss):
                    metrics.event("stop", progress.step, reason="non-finite loss")
                    raise NonFiniteLossError(
                        f"loss is {mean_loss} at step {progress.step}; stopped. The last good "
                        f"checkpoint is kept in {cfg.checkpoint_dir}"
                    )
                elapsed = time.perf_counter() - window_start
                rate = (time.perf_counter() - started) / (progress.step - first_step)
                metrics.train(
                    {
                        "step": progress.step,
                        "tokens": progress.tokens,
                        "loss": mean_loss,
                        "lr": lr,
                        "grad_norm": grad_norm.item(),
                        "step_s": elapsed / window_steps,
                        "tok_s": tokens_per_step * window_steps / elapsed,
                        **memory.peaks(),
                    },
                    eta_s=rate * (end - progress.step),
                )
                loss_sum.zero_()
                window_start, window_steps = time.perf_counter(), 0
            if cfg.eval.every and progress.step % cfg.eval.every == 0 and progress.step < end:
                run_eval()
            stopping = distributed.any_rank(stop.signal is not None, device)
            if stopping or (
                cfg.checkpoint.every
                and progress.step % cfg.checkpoint.every == 0
                and progress.step < end
            ):
                save(step_loss)
            if stopping:
                metrics.event("stop", progress.step, reason=stop.signal or "signal on another rank")
                log.info(
                    "stopped by %s at step %d; resume with --resume latest",
                    stop.signal or "signal",
                    progress.step,
                )
                break
        else:
            run_eval()
            save(step_loss)

    wall_s = time.perf_counter() - started
    summary = {
        "step": progress.step,
        "total_steps": steps,
        "tokens": progress.tokens,
        "final_val_loss": progress.last_val_loss,
        "final_val_ppl": math.exp(progress.last_val_loss)
        if progress.last_val_loss < 50
        else math.inf,
        "best_val_loss": progress.best_val_loss,
        "wall_s": wall_s,
        "tok_s": (progress.step - first_step) * tokens_per_step / max(wall_s, 1e-9),
        **memory.peaks(),
    }
    if env.is_main:
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    metrics.close()
    return RunResult(run_dir, progress, model, data, summary)
