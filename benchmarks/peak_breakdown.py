"""What is allocated at a CUDA run's peak, and where it was allocated: the allocator's trace
(`torch.cuda.memory._record_memory_history`, Python stacks) replayed to the moment the
allocated bytes were highest, and the blocks live then grouped by the first frame outside torch
(the line of ours or of a peer that asked for them). Two runs' breakdowns side by side say
which allocations one has at its peak that the other does not.

One row, `(untraced)`, is the allocated total at the end less the trace's net change, at the
peak. It holds two things: blocks allocated before the trace began (a ring buffer of the last
`MAX_EVENTS` events), and the allocator's rounding: the trace records each allocation's
requested bytes, `memory_allocated` its block's (512-byte rounding, and in the large pool up to
1 MiB of a cached block left unsplit). The rows after it tell the two apart: the untraced
blocks live at the end, the trace's frees of blocks it never saw allocated, the trace's event
count (a full buffer dropped the first events), and the rounding of the blocks live at the end
by allocating line. Use:

    with recording():
        run()
    rows = breakdown()  # [{"where": "file:line fn", "bytes": n}, ...], largest first
"""

from __future__ import annotations

from contextlib import contextmanager

MAX_EVENTS = 2_000_000  # a 1B step allocates ~5,000 blocks; a 40-step run with its compile fits
UNTRACED = "(untraced)"


@contextmanager
def recording():
    import torch

    torch.cuda.memory._record_memory_history(stacks="python", max_entries=MAX_EVENTS)
    try:
        yield
    finally:
        torch.cuda.synchronize()


def breakdown(top: int = 15) -> list[dict]:
    """The live blocks at the trace's allocation peak, by allocating frame (see the module)."""
    import torch

    snapshot = torch.cuda.memory._snapshot()
    torch.cuda.memory._record_memory_history(enabled=None)
    events = snapshot["device_traces"][torch.cuda.current_device()]
    rows = live_at_peak(events, torch.cuda.memory_allocated(), top)
    # a full ring buffer dropped the first events: "(untraced)" then holds early blocks
    actions: dict[str, int] = {}
    for e in events:
        actions[e["action"]] = actions.get(e["action"], 0) + 1
    rows.append({"where": "(trace events)", "count": len(events), "of": MAX_EVENTS, **actions})
    segments = snapshot["segments"]
    return rows + untraced(segments, events) + freed_untraced(events) + rounding(segments)


def rounding(segments: list[dict], top: int = 8) -> list[dict]:
    """The allocator's rounding in the blocks live at the end (block size less requested size:
    512-byte steps, and up to 1 MiB of a cached large block left unsplit), summed by the
    allocating frame, largest first; its total first."""
    by: dict[str, int] = {}
    for seg in segments:
        for b in seg["blocks"]:
            if b["state"] == "active_allocated":
                site = where(b["frames"]) if b.get("frames") else "?"
                by[site] = by.get(site, 0) + b["size"] - b.get("requested_size", b["size"])
    rows = sorted(by.items(), key=lambda kv: -kv[1])
    total = {"where": "(rounding at the end)", "bytes": sum(by.values())}
    return [total] + [{"where": f"(rounding) {k}", "bytes": v} for k, v in rows[:top] if v]


def freed_untraced(events: list[dict], top: int = 8) -> list[dict]:
    """The blocks from before the trace that it saw freed, largest first, each with the
    frames of its free (which code held them) and the event's index (when)."""
    seen: set[int] = set()
    freed = []
    for i, e in enumerate(events):
        if e["action"] == "alloc":
            seen.add(e["addr"])
        elif e["action"] == "free_completed" and e["addr"] not in seen:
            freed.append((e["size"], i, where(e.get("frames", []))))
    freed.sort(key=lambda f: -f[0])
    return [
        {"where": f"{UNTRACED} freed at event {i}: {site}", "bytes": size}
        for size, i, site in freed[:top]
    ]


def untraced(segments: list[dict], events: list[dict], top: int = 8) -> list[dict]:
    """The blocks live at the end that no traced `alloc` made (parts of the `(untraced)` row),
    largest first, with the frames the allocator kept for them if any."""
    live: set[int] = set()
    for e in events:
        if e["action"] == "alloc":
            live.add(e["addr"])
        elif e["action"] == "free_completed":
            live.discard(e["addr"])
    blocks = [
        b
        for seg in segments
        for b in seg["blocks"]
        if b["state"] == "active_allocated" and b["address"] not in live
    ]
    blocks.sort(key=lambda b: -b["size"])
    return [
        {
            "where": f"{UNTRACED} block: {where(b['frames']) if b.get('frames') else '?'}",
            "bytes": b["size"],
        }
        for b in blocks[:top]
    ]


def where(frames: list[dict]) -> str:
    """The first frame (innermost first, as the trace lists them) outside torch itself."""
    for f in frames:
        name = f.get("filename", "")
        if "/torch/" not in name and not name.startswith("<"):
            return f"{'/'.join(name.rsplit('/', 2)[-2:])}:{f.get('line')} {f.get('name')}"
    return "(torch internals)"


def live_at_peak(events: list[dict], allocated_at_end: int, top: int = 15) -> list[dict]:
    """Replay `alloc` / `free_completed` events; at the highest running total, the live blocks
    grouped by `where` of their allocation, largest first (`top` of them, the rest summed), with
    the untraced bytes (blocks from before the trace, the allocator's rounding) as one row.
    Also the peak itself, as a first row `(peak)`."""
    live: dict[int, tuple[int, str]] = {}
    net = peak_net = 0
    at_peak: dict[int, tuple[int, str]] = {}
    for e in events:
        if e["action"] == "alloc":
            live[e["addr"]] = (e["size"], where(e.get("frames", [])))
            net += e["size"]
            if net > peak_net:
                peak_net, at_peak = net, dict(live)
        elif e["action"] == "free_completed":
            net -= e["size"]  # a block from before the trace too: its bytes were counted in B
            live.pop(e["addr"], None)
    before = allocated_at_end - net  # at the trace's start, plus the rounding (at the end)
    groups: dict[str, int] = {}
    for size, site in at_peak.values():
        groups[site] = groups.get(site, 0) + size
    traced = sum(groups.values())
    rows = sorted(({"where": k, "bytes": v} for k, v in groups.items()), key=lambda r: -r["bytes"])
    rest = sum(r["bytes"] for r in rows[top:])
    rows = rows[:top] + ([{"where": "(the rest)", "bytes": rest}] if rest else [])
    return [
        {"where": "(peak)", "bytes": before + peak_net},
        # untraced bytes live at the peak
        {"where": UNTRACED, "bytes": before + peak_net - traced},
        *rows,
    ]
