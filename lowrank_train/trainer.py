"""The training loop. It builds what the config names and steps it; it never names a method.

One step: grad_accum micro-batches (forward, loss / accum, backward) -> clip the global grad
norm -> optimizer step -> scheduler step -> the layers' after_step hooks -> log / eval / save at
their cadence. The loss reaches the host only at logging steps and before a save, so the loop
adds no per-step synchronisation.
"""

from __future__ import annotations

import json
import logging
import math
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from lowrank_train import checkpoint as ckpt
from lowrank_train import distributed
from lowrank_train.config import RunConfig, dump_yaml, to_dict
from lowrank_train.data import (
    BlockLoader,
    TokenData,
    check_sizes,
    prepare_data,
    split_block,
)
from lowrank_train.errors import CheckpointError, NonFiniteLossError, OutOfMemory
from lowrank_train.evaluation import causal_lm_loss, compute_context, evaluate
from lowrank_train.memory import MemoryMonitor
from lowrank_train.metrics import Metrics
from lowrank_train.models import build_model, describe
from lowrank_train.optim import build_optimizer
from lowrank_train.optim.per_layer import compile_layers
from lowrank_train.optim.schedule import build_scheduler, warmup_steps
from lowrank_train.parameterizations import ParameterizedLinear
from lowrank_train.planner import plan_run, suggestions
from lowrank_train.precision import resolve_precision, warn_if_emulated
from lowrank_train.resume import check_resumable, resolve_resume
from lowrank_train.stopping import StopFlag

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


def total_steps(cfg: RunConfig, world_size: int) -> int:
    t = cfg.train
    if t.steps:
        return t.steps
    return max(1, t.tokens // (t.batch_size * t.grad_accum * world_size * cfg.model.seq_len))


@dataclass
class Built:
    """What a run trains: the model, its optimizer and schedule, and (given tokens) its loader."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    total: int  # optimizer steps of the schedule
    loader: BlockLoader | None


def build_run(
    cfg: RunConfig,
    vocab_size: int,
    device: torch.device,
    world_size: int = 1,
    rank: int = 0,
    tokens: np.ndarray | None = None,
) -> Built:
    """The one builder of a run, for `train` and for the memory planner (which builds on the
    meta device, so nothing is allocated and the two never disagree about what is built)."""
    model = build_model(cfg, vocab_size, device)
    optimizer = build_optimizer(cfg, model, device)
    total = total_steps(cfg, world_size)
    warmup = warmup_steps(total, cfg.train.warmup_ratio, cfg.train.warmup_steps)
    scheduler = build_scheduler(optimizer, total, warmup, cfg.train.min_lr_ratio)
    loader = None
    if tokens is not None:
        t = cfg.train
        loader = BlockLoader(tokens, cfg.model.seq_len, t.batch_size, t.seed, rank, world_size)
    return Built(model, optimizer, scheduler, total, loader)


class Trainer:
    """Builds a run from its config (model, optimizer, schedule, data) and steps it."""

    def __init__(self, cfg: RunConfig, resume: str | None = None):
        if resume is None and any(cfg.checkpoint_dir.glob("step-*")):
            raise CheckpointError(
                f"{cfg.checkpoint_dir} already holds checkpoints: continue them with "
                "--resume latest, or give the run another name or out_dir"
            )
        self.cfg, self.env = cfg, distributed.setup(cfg.train.device)
        device = self.env.device
        checkpoint = resolve_resume(resume, cfg.checkpoint_dir) if resume else None
        self.precision = resolve_precision(cfg.model, device)
        if checkpoint is not None:  # before anything is built: a refusal costs nothing
            check_resumable(checkpoint, cfg, self.env.world_size, self.precision)
        if self.env.is_main:
            cfg.run_dir.mkdir(parents=True, exist_ok=True)
            (cfg.run_dir / "config.yaml").write_text(dump_yaml(cfg))
        torch.manual_seed(cfg.train.seed)
        self.memory = MemoryMonitor(device, cfg.memory.cap_gib)
        self.data = prepare_data(cfg.data, cfg.model.preset, self.env.rank, self.env.world_size)
        check_sizes(self.data, cfg.model.seq_len, cfg.train.batch_size * self.env.world_size)
        self.plan = plan_run(cfg, device, self.data.vocab_size, self.env.world_size)
        log.info("%s", self.plan.summary())
        for suggestion in self.plan.suggestions:
            log.warning("memory: %s", suggestion)
        self.progress = Progress()
        with self.reporting_oom():
            built = build_run(
                cfg,
                self.data.vocab_size,
                device,
                self.env.world_size,
                self.env.rank,
                self.data.train,
            )
        self.model, self.optimizer, self.scheduler = built.model, built.optimizer, built.scheduler
        self.total, self.loader = built.total, built.loader
        self.autocast = self.precision.autocast
        log.info(
            "%s | weights %s, autocast %s (%s), device %s x%d",
            describe(self.model, cfg),
            self.precision.dtype,
            self.autocast or "off",
            self.precision.reason,
            device,
            self.env.world_size,
        )
        warn_if_emulated(self.precision, device)
        if checkpoint is not None:
            self.restore(checkpoint)
        self.metrics = Metrics(
            cfg.run_dir, self.env.is_main, self.total, cfg.logging, cfg.name, to_dict(cfg)
        )
        if checkpoint is not None:
            self.metrics.event("resume", self.progress.step, path=str(checkpoint.path))
        # Only layers with periodic events are called after each step (no per-step Python for dense).
        self.hooked = [
            m
            for m in self.model.modules()
            if isinstance(m, ParameterizedLinear)
            and type(m).after_step is not ParameterizedLinear.after_step
        ]
        # layers whose step's graph can differ ask for an eager step (compiled runs only)
        self.eager_askers = [
            m
            for m in self.model.modules()
            if cfg.train.compile
            and isinstance(m, ParameterizedLinear)
            and type(m).steps_uncompiled is not ParameterizedLinear.steps_uncompiled
        ]
        self.wrapped = (
            DistributedDataParallel(self.model) if self.env.world_size > 1 else self.model
        )
        self.loss_fn = causal_lm_loss
        if cfg.train.compile and cfg.optim.per_layer:
            compile_layers(self.model)  # one whole-model graph would run every hook at its end
        elif cfg.train.compile:
            self.loss_fn = torch.compile(causal_lm_loss)
        self.tokens_per_step = (
            cfg.train.batch_size * cfg.train.grad_accum * self.env.world_size * cfg.model.seq_len
        )
        self.tokenizer_json = self.data.tokenizer_path.read_text()
        self.last_lr = self.optimizer.param_groups[0]["lr"]
        self.events: list[dict] = []  # the layers' (merges); the optimizer keeps its own

    @contextmanager
    def reporting_oom(self):
        """Out of memory becomes one line: the step, the plan's breakdown and the changes that
        would save memory (the planner re-run with each). Nothing is saved after it, so the
        last good checkpoint is the one to resume (a per-layer step may have stepped some
        tensors and not others)."""
        try:
            yield
        except torch.OutOfMemoryError:
            cfg, plan = self.cfg, self.plan
            tips = plan.suggestions or suggestions(
                cfg, self.env.device, self.data.vocab_size, self.env.world_size, plan
            )
            advice = f"try {'; '.join(tips)}" if tips else "no setting the planner knows helps"
            raise OutOfMemory(
                f"out of memory in step {self.progress.step + 1} under memory.cap_gib="
                f"{cfg.memory.cap_gib:g} (measured peak {self.memory.peaks()['peak_gib']:.2f} "
                f"GiB); {plan.summary()}; {advice}; the last good checkpoint is kept in "
                f"{cfg.checkpoint_dir}"
            ) from None

    def restore(self, checkpoint: ckpt.Checkpoint) -> None:
        self.model.load_state_dict(checkpoint.model)
        self.optimizer.load_state_dict(checkpoint.optimizer)
        state = checkpoint.trainer
        self.scheduler.load_state_dict(state["scheduler"])
        self.loader.load_state_dict(state["loader"])
        ckpt.restore_rng(state["rng"])
        self.progress = Progress(
            state["step"], state["tokens"], state["best_val_loss"], state["last_val_loss"]
        )
        log.info(
            "resumed from %s at step %d (%s tokens)",
            checkpoint.path,
            self.progress.step,
            f"{self.progress.tokens:,}",
        )

    def forward_backward(self) -> torch.Tensor:
        """Forward and backward of the step's grad_accum micro-batches: their summed loss."""
        accum, device = self.cfg.train.grad_accum, self.env.device
        step_loss = torch.zeros((), device=device)
        for micro in range(accum):
            inputs, labels = split_block(next(self.loader).to(device, non_blocking=True))
            skip_sync = (
                micro < accum - 1 and self.env.world_size > 1
            )  # all-reduce once, at the last
            with (
                self.wrapped.no_sync() if skip_sync else nullcontext(),
                compute_context(device, self.autocast),
            ):
                loss = self.loss_fn(self.wrapped, inputs, labels)
            if accum > 1:
                loss = loss / accum
            loss.backward()
            step_loss += loss.detach()
        return step_loss

    def step(self, clip: float) -> tuple[torch.Tensor, torch.Tensor | None]:
        """One optimizer step over grad_accum micro-batches: (summed loss, grad norm or None)."""
        eager = any(m.steps_uncompiled() for m in self.eager_askers)
        with torch.compiler.set_stance("force_eager") if eager else nullcontext():
            step_loss = self.forward_backward()
        grad_norm = self.optimizer.clip_grad_norm_(clip) if clip else None
        self.last_lr = self.optimizer.param_groups[0]["lr"]  # the lr this step used, for the log
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        self.progress.step += 1
        self.progress.tokens += self.tokens_per_step
        for layer in self.hooked:
            self.events += layer.after_step(self.progress.step, self.optimizer)
        return step_loss, grad_norm

    def save(self, last_loss: torch.Tensor | None) -> None:
        """Rank 0 writes the checkpoint; never one whose last loss is not finite (None: no step
        taken since the resume that loaded it)."""
        value = distributed.mean_across_ranks(last_loss).item() if last_loss is not None else 0.0
        if not math.isfinite(value):
            raise NonFiniteLossError(f"loss is {value} at step {self.progress.step}; not saving")
        p = self.progress
        if self.env.is_main:
            trainer_state = {
                "step": p.step,
                "tokens": p.tokens,
                "scheduler": self.scheduler.state_dict(),
                "loader": self.loader.state_dict(),
                "rng": ckpt.capture_rng(),
                "world_size": self.env.world_size,
                "precision": self.precision.record(),
                "best_val_loss": p.best_val_loss,
                "last_val_loss": p.last_val_loss,
            }
            path = ckpt.save_checkpoint(
                self.cfg.checkpoint_dir,
                p.step,
                model_state=self.model.state_dict(),
                optimizer_state=self.optimizer.state_dict(),
                trainer_state=trainer_state,
                config_yaml=dump_yaml(self.cfg),
                tokenizer_json=self.tokenizer_json,
                keep_last=self.cfg.checkpoint.keep_last,
            )
            self.metrics.event("checkpoint", p.step, path=str(path))
        distributed.barrier()

    def run_eval(self) -> None:
        val = evaluate(self.model, self.data, self.cfg, self.env.device, self.autocast)
        self.progress.last_val_loss, self.progress.best_val_loss = (
            val,
            min(self.progress.best_val_loss, val),
        )
        self.metrics.eval(self.progress.step, self.progress.tokens, val)

    def due(self, every: int, end: int) -> bool:
        return bool(every) and self.progress.step % every == 0 and self.progress.step < end

    def run(self) -> RunResult:
        cfg, p = self.cfg, self.progress
        end = min(self.total, cfg.train.stop_at) if cfg.train.stop_at else self.total
        self.model.train()
        loss_sum = torch.zeros((), device=self.env.device)
        started, first_step = time.perf_counter(), p.step
        window_start, window_steps, step_loss = started, 0, None
        with StopFlag() as stop, self.reporting_oom():
            while p.step < end:
                log_now = (p.step + 1) % cfg.logging.every == 0 or p.step + 1 == end
                # without clipping, the norm is still measured at logging steps (inf: no-op clip)
                step_loss, grad_norm = self.step(
                    cfg.train.clip_grad_norm or (math.inf if log_now else 0)
                )
                loss_sum += step_loss
                window_steps += 1
                if p.step == first_step + 1 and not log_now:
                    self.log_first_step(step_loss, started, end)
                if log_now:
                    self.log_window(
                        loss_sum / window_steps,
                        grad_norm,
                        window_start,
                        window_steps,
                        end - p.step,
                    )
                    loss_sum.zero_()
                    self.write_events()
                    window_start, window_steps = time.perf_counter(), 0
                if self.due(cfg.eval.every, end):
                    self.run_eval()
                # Ranks agree on a stop through an all-reduce, a host sync: under DDP only at
                # logging steps, so a signal is answered within logging.every steps.
                stopping = stop.signal is not None
                if self.env.world_size > 1:
                    stopping = log_now and distributed.any_rank(stopping, self.env.device)
                if stopping or self.due(cfg.checkpoint.every, end):
                    self.save(step_loss)
                if stopping:
                    self.metrics.event(
                        "stop", p.step, reason=stop.signal or "signal on another rank"
                    )
                    log.info("stopped at step %d; resume with --resume latest", p.step)
                    break
            else:
                self.run_eval()
                if cfg.checkpoint.at_end:
                    self.save(step_loss)
        return self.finish(time.perf_counter() - started, first_step)

    def write_events(self) -> None:
        """Refreshes, resamples, kept-old-basis and merges since the last logging step."""
        for event in self.optimizer.pop_events() + self.events:
            fields = {k: v for k, v in event.items() if k not in ("event", "step")}
            self.metrics.event(event["event"], event.get("step", self.progress.step), **fields)
        self.events = []

    def log_first_step(self, step_loss: torch.Tensor, started: float, end: int) -> None:
        """Nothing may look hung: the first step's wall time and when the first progress line
        comes (one host sync, once)."""
        distributed.mean_across_ranks(step_loss).item()
        first_s = time.perf_counter() - started
        every = self.cfg.logging.every
        next_log = min(end, (self.progress.step // every + 1) * every)
        log.info(
            "step %d took %.1f s (the first pays warm-up%s); first progress line at step %d "
            "within about %.0f s",
            self.progress.step,
            first_s,
            " and the compile" if self.cfg.train.compile else "",
            next_log,
            first_s * (next_log - self.progress.step),
        )

    def log_window(
        self,
        mean_loss: torch.Tensor,
        grad_norm: torch.Tensor,
        start: float,
        steps: int,
        remaining: int,
    ) -> None:
        """The one host sync of a logging window; under DDP the mean over every rank's shard.
        The ETA uses this window's pace, so a compile or a slow start does not inflate it."""
        loss = distributed.mean_across_ranks(mean_loss).item()
        p = self.progress
        if not math.isfinite(loss):
            self.metrics.event("stop", p.step, reason="non-finite loss")
            raise NonFiniteLossError(
                f"loss is {loss} at step {p.step}; stopped. The last good checkpoint is "
                f"kept in {self.cfg.checkpoint_dir}"
            )
        elapsed = time.perf_counter() - start
        self.metrics.train(
            {
                "step": p.step,
                "tokens": p.tokens,
                "loss": loss,
                "lr": self.last_lr,
                "grad_norm": grad_norm.item(),
                "step_s": elapsed / steps,
                "tok_s": self.tokens_per_step * steps / elapsed,
                **self.memory.peaks(),
            },
            eta_s=elapsed / steps * remaining,
        )

    def finish(self, wall_s: float, first_step: int) -> RunResult:
        p = self.progress
        summary = {
            "step": p.step,
            "total_steps": self.total,
            "tokens": p.tokens,
            "final_val_loss": p.last_val_loss,
            "final_val_ppl": math.exp(p.last_val_loss) if p.last_val_loss < 50 else math.inf,
            "best_val_loss": p.best_val_loss,
            "wall_s": wall_s,
            "tok_s": (p.step - first_step) * self.tokens_per_step / max(wall_s, 1e-9),
            **self.memory.peaks(),
            "planned_gib": self.plan.total_gib,
        }
        if self.env.is_main:
            (self.cfg.run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        self.metrics.close()
        return RunResult(self.cfg.run_dir, p, self.model, self.data, summary)


def train(cfg: RunConfig, resume: str | None = None) -> RunResult:
    """Run (or resume) the configured training; returns the trained model and its summary."""
    try:
        return Trainer(cfg, resume).run()
    finally:
        distributed.teardown()  # under torchrun: leave no process group behind
