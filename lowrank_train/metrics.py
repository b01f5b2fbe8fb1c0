"""The progress line, metrics.jsonl (one JSON object a line) and optional wandb, rank 0 only."""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


def format_duration(seconds: float) -> str:
    seconds = int(max(0, seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


class Metrics:
    """Writes train/eval lines and events; a no-op on ranks other than 0."""

    def __init__(
        self,
        run_dir: Path,
        enabled: bool,
        total_steps: int,
        wandb_cfg: Any = None,
        run_name: str = "",
        config: dict | None = None,
    ):
        self.enabled = enabled
        self.total_steps = total_steps
        self.file = open(run_dir / "metrics.jsonl", "a") if enabled else None  # noqa: SIM115 (closed in close())
        self.wandb = None
        if enabled and wandb_cfg is not None and wandb_cfg.wandb:
            import wandb  # imported only when asked for

            self.wandb = wandb.init(
                project=wandb_cfg.wandb_project,
                mode=wandb_cfg.wandb_mode,
                name=run_name,
                dir=str(run_dir),
                config=config,
            )

    def _write(self, record: dict) -> None:
        if not self.enabled:
            return
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()

    def train(self, record: dict, eta_s: float) -> None:
        """record: step, tokens, loss, lr, grad_norm, step_s, tok_s, peak_gib, peak_alloc_gib, peak_reserved_gib,
        alloc_retries."""
        record = {**record, "time": time.time()}
        self._write(record)
        if not self.enabled:
            return
        log.info(
            "step %d/%d | loss %.4f | lr %.2e | grad %.3f | %s tok/s | peak %.2f GiB | eta %s",
            record["step"],
            self.total_steps,
            record["loss"],
            record["lr"],
            record["grad_norm"],
            f"{record['tok_s']:,.0f}",
            record["peak_gib"],
            format_duration(eta_s),
        )
        if self.wandb is not None:
            self.wandb.log(
                {f"train/{k}": v for k, v in record.items() if v is not None}, step=record["step"]
            )

    def eval(self, step: int, tokens: int, val_loss: float) -> float:
        val_ppl = math.exp(val_loss) if val_loss < 50 else float("inf")
        self._write(
            {
                "step": step,
                "tokens": tokens,
                "val_loss": val_loss,
                "val_ppl": val_ppl,
                "time": time.time(),
            }
        )
        if self.enabled:
            log.info("eval step %d | val_loss %.4f | val_ppl %.2f", step, val_loss, val_ppl)
            if self.wandb is not None:
                self.wandb.log({"val/loss": val_loss, "val/ppl": val_ppl}, step=step)
        return val_ppl

    def event(self, name: str, step: int, **fields: Any) -> None:
        self._write({"event": name, "step": step, **fields, "time": time.time()})

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
        if self.wandb is not None:
            self.wandb.finish()
