"""Peak memory as a 24 GiB card must hold it, and the cap that emulates such a card.

On CUDA, `peak_gib` = max_memory_reserved + the CUDA context (device memory in use after
initialisation, before the first tensor, from torch.cuda.mem_get_info); the cap limits the
allocator to cap_gib less that context. On CPU the peak is the process's maximum resident set.
What a run will need, before anything is allocated, is planner.py's job.
"""

from __future__ import annotations

import logging
import resource

import torch

from lowrank_train.errors import ConfigError

log = logging.getLogger(__name__)
GIB = 2**30


class MemoryMonitor:
    """Measures the CUDA context once, applies `cap_gib`, and reports peaks in GiB."""

    def __init__(self, device: torch.device, cap_gib: float):
        self.device = device
        self.context_bytes = 0
        if device.type == "cuda":
            torch.cuda.init()
            if device.index is None:  # torch's memory-fraction call needs an index
                device = self.device = torch.device("cuda", torch.cuda.current_device())
            free, total = torch.cuda.mem_get_info(device)
            self.context_bytes = total - free
            if cap_gib > 0:
                fraction = (cap_gib * GIB - self.context_bytes) / total
                if fraction <= 0:
                    raise ConfigError(
                        f"memory.cap_gib: {cap_gib} is below the CUDA context "
                        f"({self.context_bytes / GIB:.2f} GiB); raise it or set 0 (no cap)"
                    )
                torch.cuda.set_per_process_memory_fraction(min(fraction, 1.0), device)
                log.info(
                    "memory cap %.1f GiB: allocator limited to %.2f GiB (context %.2f GiB)",
                    cap_gib,
                    cap_gib - self.context_bytes / GIB,
                    self.context_bytes / GIB,
                )
        elif cap_gib > 0:
            log.info(
                "memory.cap_gib=%g is not enforced on %s (peak = max resident set size)",
                cap_gib,
                device.type,
            )

    def peaks(self) -> dict[str, float | None]:
        if self.device.type == "cuda":
            reserved = torch.cuda.max_memory_reserved(self.device)
            return {
                "peak_gib": (reserved + self.context_bytes) / GIB,
                "peak_alloc_gib": torch.cuda.max_memory_allocated(self.device) / GIB,
                "peak_reserved_gib": reserved / GIB,
                # cache flushes to satisfy an allocation: each one synchronizes and frees
                # every cached block, the cost of running close to the cap
                "alloc_retries": torch.cuda.memory_stats(self.device).get("num_alloc_retries", 0),
            }
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
        return {
            "peak_gib": rss / GIB,
            "peak_alloc_gib": None,
            "peak_reserved_gib": None,
            "alloc_retries": None,
        }
