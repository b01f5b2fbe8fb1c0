"""What the training benchmarks share (bench_train, bench_params): the sizes, our methods as run
configs, a case's run through our `train()`, a peer library's optimizer in a hand-written loop
over the same model, data and loss, the step-time summary, the planner's prediction, the
parent's loop that writes each row as its case ends, the README table and the PNG.

Timing, for ours and the peers alike: the loss is read every `EVERY` steps; a window is the wall
time of those steps. Steady step time = the median window without a refresh or merge, the first
window (compile, first refresh, warm-up) dropped, over EVERY. step-0 time = the first window
less EVERY - 1 steady steps. Amortized rate over one period of the method's gap T:
    tok_s_amortized = T * tokens_per_step / (T * steady_step_s + event_s),
event_s the measured cost of one refresh or merge (ours: the optimizer's own timing of a later
refresh, else the cold first one; a peer: a later refresh window's excess over a steady one,
else, uncompiled, the first step's excess over a steady step). Every row says which.
"""

from __future__ import annotations

import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import yaml
from harness import result_line, run_cases, write_results

ROOT = Path(__file__).resolve().parents[1]
RUNS, METHODS = ROOT / "configs" / "runs", ROOT / "configs" / "methods"
EVERY = 10
CAP_GIB = 24.0
GIB = 2**30


@dataclass(frozen=True)
class Size:
    """A row of the matrix: the preset, micro-batch and checkpointing the issues fix (seq 256)."""

    preset: str | None  # None: the base file's model (the tiny test model)
    batch_size: int | None
    checkpointing: bool
    steps: int
    base: Path = RUNS / "dense_1b_24gb.yaml"  # bpe vocab 32000, the loop benchmark's run
    recipe_size: str | None = None  # run files to read when the size has none (13b: the 7b ones)


SIZES = {
    "tiny": Size(None, None, False, 30, RUNS / "tiny_cpu.yaml"),
    "350m": Size("llama_350m", 8, False, 100),
    "1b": Size("llama_1b", 32, False, 100),
    "7b": Size("llama_7b", 4, True, 40),
    "13b": Size("llama_13b", 4, True, 30, recipe_size="7b"),
}


@dataclass(frozen=True)
class Method:
    """One of our configurations: weights.name, the files composed over the size's base
    ("runs:x" = configs/runs/x_<size>.yaml, else configs/methods/x.yaml; "methods:x" = the
    fragment alone), extra overrides, and per-layer stepping."""

    weights: str
    files: tuple[str, ...] = ()
    overrides: tuple[str, ...] = ()
    per_layer: bool = False


OURS = {
    "adamw": Method("dense"),
    "adamw8bit": Method("dense", ("methods:adamw8bit",)),
    "adamw8bit+pl": Method("dense", ("methods:adamw8bit",), per_layer=True),
    "lowrank": Method("lowrank", ("runs:lowrank",)),
    "sltrain": Method("sltrain", ("runs:sltrain",)),
    "lost": Method("lost", ("runs:lost",)),
    "loqt": Method("loqt", ("runs:loqt",)),
    "loqt+pl": Method("loqt", ("runs:loqt",), per_layer=True),
    "int8": Method("int8", ("runs:int8",)),
    "galore": Method("dense", ("runs:galore",)),
    "galore+8bit+pl": Method(
        "dense", ("runs:galore", "methods:adamw8bit"), ("optim.state_dtype=int8",), True
    ),
    "apollo": Method("dense", ("runs:apollo",)),
    "apollo+pl": Method("dense", ("runs:apollo",), per_layer=True),
    "apollo_mini": Method("dense", ("runs:apollo_mini",)),
    "apollo_mini+pl": Method("dense", ("runs:apollo_mini",), per_layer=True),
    # a composition no paper ran: GaLore's fragment (rank 128) over SLTrain's factors
    "sltrain+galore": Method("sltrain", ("runs:sltrain", "methods:galore")),
    # the composed recipe (configs/runs/int8_qgalore_<size>.yaml) wins where it exists
    "int8+qgalore": Method("int8", ("runs:int8", "runs:qgalore", "runs:int8_qgalore")),
    "int8+qgalore+pl": Method(
        "int8", ("runs:int8", "runs:qgalore", "runs:int8_qgalore"), per_layer=True
    ),
    "int8+apollo_mini+pl": Method("int8", ("runs:int8", "runs:apollo_mini"), per_layer=True),
    # weights.matmul=dequantize: deq(W) of one layer, then cuBLAS (the fused kernels' rival)
    "int8+deq": Method("int8", ("runs:int8",), ("weights.matmul=dequantize",)),
    "int8+apollo_mini+pl+deq": Method(
        "int8", ("runs:int8", "runs:apollo_mini"), ("weights.matmul=dequantize",), True
    ),
    "int8+qgalore+pl+deq": Method(
        "int8",
        ("runs:int8", "runs:qgalore", "runs:int8_qgalore"),
        ("weights.matmul=dequantize",),
        True,
    ),
    "int8+apollo+pl": Method("int8", ("runs:int8", "runs:apollo"), per_layer=True),
}


@dataclass(frozen=True)
class Peer:
    """A peer library's optimizer: provider, whose recipe gives its rank/gap/scale, per-layer."""

    provider: str
    method: str
    recipe: str | None = None
    per_layer: bool = False


PEERS = {
    "torch-adamw": Peer("torch", "adamw"),
    "bnb-adamw8bit": Peer("bnb", "adamw8bit"),
    "galore-torch": Peer("galore-torch", "galore", "galore"),
    "galore-torch-8bit": Peer("galore-torch", "galore8bit", "galore"),
    "galore-torch-8bit-pl": Peer("galore-torch", "galore8bit", "galore", True),
    "apollo-torch": Peer("apollo-torch", "apollo", "apollo"),
    "apollo-torch-mini": Peer("apollo-torch", "apollo_mini", "apollo_mini"),
    "apollo-torch-pl": Peer("apollo-torch", "apollo", "apollo", True),
    "apollo-torch-mini-pl": Peer("apollo-torch", "apollo_mini", "apollo_mini", True),
}


# -- a case's config ---------------------------------------------------------------------------


def recipe_file(entry: str, size: str) -> Path | None:
    """configs/runs/<x>_<size>.yaml for "runs:x" (13b: the 7b file), else the fragment."""
    kind, stem = entry.split(":")
    sized = SIZES[size].recipe_size or size
    run = RUNS / f"{stem}_{sized}.yaml"
    if kind == "runs" and size != "tiny" and run.is_file():
        return run
    fragment = METHODS / f"{stem}.yaml"
    return fragment if fragment.is_file() else None


def compose(files: list[Path], where: Path) -> Path:
    """A run file that includes `files` in order (later wins), written to `where`."""
    where.parent.mkdir(parents=True, exist_ok=True)
    where.write_text(yaml.safe_dump({"include": [str(f) for f in files]}))
    return where


def common_overrides(case: dict) -> list[str]:
    """The workload and the bench's flags, the same for ours and the peers' model."""
    size = SIZES[case["size"]]
    out = [
        # the recipe's schedule, stopped after the case's steps: a short run of its own schedule
        # would warm up to the peak lr in a few steps and diverge (a 7B case did, at 1e-2)
        f"train.stop_at={case['steps']}",
        f"train.grad_accum={case['grad_accum']}",
        f"train.clip_grad_norm={case['clip']}",
        f"train.compile={str(case['compile']).lower()}",
        f"model.gradient_checkpointing={str(size.checkpointing).lower()}",
        f"memory.cap_gib={case['cap_gib']}",
        f"logging.every={EVERY}",
        "eval.every=0",
        "eval.max_tokens=2048",
        "checkpoint.every=0",
        "checkpoint.at_end=false",
    ]
    if size.preset:
        out += [f"model.preset={size.preset}", "model.seq_len=256"]
    if size.batch_size:
        out.append(f"train.batch_size={size.batch_size}")
    if case.get("cache"):
        out.append(f"data.cache={case['cache']}")
    return out


def our_run_file(name: str, case: dict, work: Path) -> Path:
    """The run file of our method `name` in `case`: the size's base (or --base), then the
    method's recipe files, composed under `work`."""
    base = Path(case["base"]) if case.get("base") else SIZES[case["size"]].base
    files = [base] + [f for e in OURS[name].files if (f := recipe_file(e, case["size"]))]
    return compose(files, work / f"{case['id'].replace(':', '_')}.yaml")


def our_config(name: str, case: dict, work: Path) -> tuple[Path, list[str]]:
    """(run file, overrides) of our method `name` in `case`: the size's base (or --base), the
    method's recipe files, the workload's overrides, then the method's and the user's."""
    method = OURS[name]
    path = our_run_file(name, case, work)
    overrides = [
        *common_overrides(case),
        f"weights.name={method.weights}",
        *method.overrides,
        # explicit both ways: the 7b recipes step per layer for one GPU, a case names its own mode
        f"optim.per_layer={str(method.per_layer).lower()}",
    ]
    return path, overrides + list(case.get("set", []))


def peer_settings(peer: Peer, case: dict) -> dict:
    """rank, gap and scale of the peer from our recipe of the same method and size (APOLLO's
    code multiplies by sqrt(--scale): its --scale is our scale squared)."""
    if peer.recipe is None:
        return {}
    from lowrank_train.resolve import load_run

    base = Path(case["base"]) if case.get("base") else SIZES[case["size"]].base
    files = [base] + [f for f in [recipe_file(f"runs:{peer.recipe}", case["size"])] if f]
    with tempfile.TemporaryDirectory() as tmp:
        path = compose(files, Path(tmp) / "peer.yaml")
        cfg, _ = load_run(path, common_overrides(case))
    opts = cfg.optim.projector.method
    scale = round(opts.scale**2, 1) if peer.provider == "apollo-torch" else opts.scale
    return {"rank": opts.rank, "update_gap": opts.update_gap, "scale": scale}


# -- the child: ours -----------------------------------------------------------------------------


def load_case(config, overrides: list[str]):
    """The case's run config: the recipe's schedule stopped after the case's steps
    (`train.stop_at`), lengthened to those steps where the recipe's schedule is shorter."""
    from lowrank_train.resolve import load_run
    from lowrank_train.trainer import total_steps

    cfg, _ = load_run(config, overrides)
    if total_steps(cfg, 1) < cfg.train.stop_at:
        cfg, _ = load_run(config, [*overrides, f"train.steps={cfg.train.stop_at}"])
    return cfg


def our_run(case: dict) -> dict:
    """Train the case through `train()`; times, peaks, events and the resolved flags."""
    import torch

    from lowrank_train.cli import setup_logging
    from lowrank_train.errors import ConfigError
    from lowrank_train.parameterizations import PARAMETERIZATIONS, ParameterizedLinear
    from lowrank_train.projectors.base import BASIS_EVENTS
    from lowrank_train.trainer import train

    setup_logging(0)
    method = OURS[case["method"]]
    if method.weights not in PARAMETERIZATIONS:
        return {"skipped": f"weights.name {method.weights!r} is not registered yet"}
    out_dir = Path(tempfile.mkdtemp(prefix="bench_"))
    try:
        cfg = load_case(case["config"], [*case["overrides"], f"out_dir={out_dir}", "name=run"])
    except ConfigError as e:
        return {"skipped": str(e)}
    settings = our_settings(cfg)
    try:
        result = train(cfg)
    except torch.OutOfMemoryError as e:
        return {"oom": str(e).splitlines()[0], "settings": settings, **cuda_peaks()}
    except Exception as e:
        if getattr(e, "exit_code", None) == 4:  # the planner's out-of-memory report
            return {"oom": str(e).splitlines()[0], "settings": settings, **cuda_peaks()}
        raise
    lines = [json.loads(x) for x in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    train_lines = [m for m in lines if "step_s" in m]
    events = [m for m in lines if m.get("event") in (*BASIS_EVENTS, "merge")]
    layers = [m for m in result.model.modules() if isinstance(m, ParameterizedLinear)]
    out = summarize(
        [m["step_s"] * EVERY for m in train_lines],
        result.summary["tokens"] // result.summary["step"],
        events,
        gap_of(cfg),
        compiled=cfg.train.compile,
    )
    out["peak_gib"] = max(m["peak_gib"] for m in train_lines)
    out["peak_alloc_gib"] = max((m["peak_alloc_gib"] or 0) for m in train_lines) or None
    out["alloc_retries"] = train_lines[-1].get("alloc_retries")
    out["params"] = sum(p.numel() for p in result.model.parameters())
    out["targeted_stored_gib"] = sum(sum(m.stored_bytes().values()) for m in layers) / GIB
    out["final_loss"] = train_lines[-1]["loss"]
    shutil.rmtree(out_dir, ignore_errors=True)  # the end-of-run checkpoint (7 GB at 7B)
    return {**out, "settings": settings}


def gap_of(cfg) -> int | None:
    """T of the run's periodic event (the projector's update_gap, or the weights' own)."""
    for section in (cfg.optim.projector.method, cfg.weights.method):
        gap = getattr(section, "update_gap", None)
        if gap:
            return gap
    return None


def our_settings(cfg) -> dict:
    """Every flag of our run that changes its cost, read from the resolved config."""
    import dataclasses

    import torch

    from lowrank_train.precision import resolve_precision

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    precision = resolve_precision(cfg.model, device)
    proj = cfg.optim.projector
    keys = ("rank", "update_gap", "scale")
    out = {
        "weights": cfg.weights.name,
        "weights_options": dataclasses.asdict(cfg.weights.method)
        if dataclasses.is_dataclass(cfg.weights.method)
        else {},
        "projector": proj.name,
        **{k: getattr(proj.method, k, None) for k in keys},
        "optim": cfg.optim.name,
        "embeddings_8bit": cfg.optim.embeddings_8bit,
        "state_dtype": cfg.optim.state_dtype,
        "per_layer": cfg.optim.per_layer,
    }
    return {**out, **workload_settings(cfg, precision)}


def workload_settings(cfg, precision) -> dict:
    """Every flag a row states (the measured steps and the schedule they were taken from)."""
    from lowrank_train.trainer import total_steps

    t = cfg.train
    return {
        "batch_size": t.batch_size,
        "grad_accum": t.grad_accum,
        "seq_len": cfg.model.seq_len,
        "gradient_checkpointing": cfg.model.gradient_checkpointing,
        "clip_grad_norm": t.clip_grad_norm,
        "dtype": str(precision.dtype).removeprefix("torch."),
        "autocast": str(precision.autocast).removeprefix("torch.") if precision.autocast else None,
        "compile": t.compile,
        "steps": t.stop_at or t.steps,
        "schedule_steps": total_steps(cfg, 1),
        "cap_gib": cfg.memory.cap_gib,
    }


def cuda_peaks() -> dict:
    import torch

    if not torch.cuda.is_available():
        return {}
    return {
        "peak_alloc_gib": torch.cuda.max_memory_allocated() / GIB,
        "peak_reserved_gib": torch.cuda.max_memory_reserved() / GIB,
        "alloc_retries": torch.cuda.memory_stats().get("num_alloc_retries", 0),
    }


# -- the child: a peer ---------------------------------------------------------------------------


def peer_optimizers(peer: Peer, opts: dict, model, targets: list[str], lr: float) -> list:
    """The peer's optimizers over the model: one (whole-model), or one per parameter (its
    README's layer-wise recipe). Targeted 2-D weights get the projection group."""
    low = {id(p) for n, p in model.named_parameters() if n.split(".")[-2] in targets}
    params = [p for p in model.parameters() if p.requires_grad]
    if peer.provider == "torch":
        import torch

        return [torch.optim.AdamW(params, lr=lr, fused=params[0].is_cuda)]
    if peer.provider == "bnb":
        import bitsandbytes as bnb

        return [bnb.optim.AdamW8bit(params, lr=lr)]
    if peer.provider == "galore-torch":
        from galore_torch import GaLoreAdamW, GaLoreAdamW8bit

        cls = GaLoreAdamW8bit if peer.method == "galore8bit" else GaLoreAdamW
        extra = {
            "rank": opts["rank"],
            "update_proj_gap": opts["update_gap"],
            "scale": opts["scale"],
            "proj_type": "std",
        }
    else:
        from apollo_torch import APOLLOAdamW as cls

        mini = peer.method == "apollo_mini"
        extra = {
            "rank": opts["rank"],
            "proj": "random",
            "scale_type": "tensor" if mini else "channel",
            "scale": opts["scale"],
            "update_proj_gap": opts["update_gap"],
            "proj_type": "std",
        }

    def group(ps: list) -> dict:
        return {"params": ps, **(extra if id(ps[0]) in low else {})}

    if peer.per_layer:
        return [cls([group([p])], lr=lr) for p in params]
    regular = [p for p in params if id(p) not in low]
    return [cls([{"params": regular}, group([p for p in params if id(p) in low])], lr=lr)]


def peer_run(case: dict) -> dict:
    """The peer's optimizer on our dense model of the case (same init, data, loss, dtypes,
    checkpointing, compile), stepped whole-model (clip, step, zero) or from post-accumulate-grad
    hooks (step and zero each parameter as its gradient completes, as the peers' READMEs)."""
    import importlib.util

    import torch

    from lowrank_train.cli import setup_logging
    from lowrank_train.data import BlockLoader, prepare_data, split_block
    from lowrank_train.evaluation import causal_lm_loss, compute_context
    from lowrank_train.memory import MemoryMonitor
    from lowrank_train.models import build_model
    from lowrank_train.optim.schedule import build_scheduler, warmup_steps
    from lowrank_train.precision import resolve_precision
    from lowrank_train.trainer import total_steps

    setup_logging(0)
    peer = PEERS[case["method"]]
    module = {"bnb": "bitsandbytes", "galore-torch": "galore_torch", "apollo-torch": "apollo_torch"}
    needed = module.get(peer.provider)
    if needed and importlib.util.find_spec(needed) is None:
        return {"skipped": f"{peer.provider} is not installed (import {needed})"}
    cfg = load_case(case["config"], case["overrides"])
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    precision = resolve_precision(cfg.model, device)
    settings = {"per_layer": peer.per_layer, **case["peer"], **workload_settings(cfg, precision)}
    memory = MemoryMonitor(device, cfg.memory.cap_gib)
    torch.manual_seed(cfg.train.seed)
    data = prepare_data(cfg.data, cfg.model.preset)
    t = cfg.train
    loader = BlockLoader(data.train, cfg.model.seq_len, t.batch_size, t.seed, 0, 1)
    try:
        model = build_model(cfg, data.vocab_size, device)
        opts = peer_optimizers(peer, case["peer"], model, cfg.weights.target, t.lr)
        total = total_steps(cfg, 1)  # the recipe's schedule, as ours (common_overrides)
        warmup = warmup_steps(total, t.warmup_ratio, t.warmup_steps)
        schedules = [build_scheduler(o, total, warmup, t.min_lr_ratio) for o in opts]
        if peer.per_layer:
            for p, opt in zip(
                [p for p in model.parameters() if p.requires_grad], opts, strict=True
            ):
                p.register_post_accumulate_grad_hook(partial(_step_one, opt))
        loss_fn = torch.compile(causal_lm_loss) if t.compile else causal_lm_loss
        windows_s, loss_sum = [], torch.zeros((), device=device)
        start = time.perf_counter()
        for step in range(1, (t.stop_at or t.steps) + 1):
            for _ in range(t.grad_accum):
                inputs, labels = split_block(next(loader).to(device, non_blocking=True))
                with compute_context(device, precision.autocast):
                    loss = loss_fn(model, inputs, labels)
                (loss / t.grad_accum if t.grad_accum > 1 else loss).backward()
                loss_sum += loss.detach()
            if not peer.per_layer:
                if t.clip_grad_norm:
                    torch.nn.utils.clip_grad_norm_(model.parameters(), t.clip_grad_norm)
                opts[0].step()
                opts[0].zero_grad(set_to_none=True)
            for s in schedules:  # once per training step (the peers' hooks step per micro-batch)
                s.step()
            if step % EVERY == 0:
                final_loss = loss_sum.item() / (EVERY * t.grad_accum)
                now = time.perf_counter()
                windows_s.append(now - start)
                print(
                    f"step {step}: loss {final_loss:.4f}, {windows_s[-1]:.2f} s for "
                    f"{EVERY} steps, {memory.peaks()}",
                    file=sys.stderr,
                    flush=True,
                )
                loss_sum.zero_()
                start = now
    except torch.OutOfMemoryError as e:
        return {"oom": str(e).splitlines()[0], "settings": settings, **memory.peaks()}
    gap = case["peer"].get("update_gap")
    # galore-torch computes an SVD at its first step and every gap after; APOLLO draws a
    # random projection (a refresh too, but not separable from the first step's warm-up)
    svd = peer.provider == "galore-torch"
    measured = t.stop_at or t.steps
    events = [{"step": s} for s in range(1, measured + 1, gap)] if svd and gap else []
    tokens_per_step = t.batch_size * t.grad_accum * cfg.model.seq_len
    out = summarize(windows_s, tokens_per_step, events, gap if svd else None, compiled=t.compile)
    out.update(memory.peaks())
    out["params"] = sum(p.numel() for p in model.parameters())
    out["final_loss"] = final_loss
    return {**out, "settings": settings}


def _step_one(opt, param) -> None:
    opt.step()
    opt.zero_grad(set_to_none=True)


# -- the step-time summary -----------------------------------------------------------------------


def summarize(
    windows_s: list[float],
    tokens_per_step: int,
    events: list[dict],
    gap: int | None,
    compiled: bool,
) -> dict:
    """Steady, amortized and step-0 figures from EVERY-step windows (the module docstring).
    events: {"step": s, "seconds"?: x}, refreshes and merges; window i holds steps
    i*EVERY+1 .. (i+1)*EVERY."""

    def window(step: int) -> int:
        return (step - 1) // EVERY

    busy = {window(e["step"]) for e in events}
    quiet = [s for i, s in enumerate(windows_s) if i > 0 and i not in busy]
    if not quiet:
        raise ValueError(f"no steady window among {len(windows_s)}: run more steps")
    quiet_s = statistics.median(quiet)
    step_s = quiet_s / EVERY
    out = {
        "tok_s": tokens_per_step / step_s,
        "step_s": step_s,
        "step0_s": windows_s[0] - (EVERY - 1) * step_s,
        "windows": len(windows_s),
        "quiet_windows": len(quiet),
        "events": len(events),
    }
    later = [e for e in events if window(e["step"]) > 0]
    timed = [e["seconds"] for e in later if "seconds" in e]
    if timed:
        cost, source = statistics.median(timed), "the optimizer's timing of later events"
    elif later:
        excess = [windows_s[window(e["step"])] - quiet_s for e in later]
        cost, source = statistics.median(excess), "later event windows' excess over a steady one"
    elif events and "seconds" in events[0]:
        cost, source = events[0]["seconds"], "the optimizer's timing of the cold first event"
    elif events and not compiled:
        cost = out["step0_s"] - step_s
        source = "the first step's excess over a steady step (uncompiled; includes warm-up)"
    else:
        cost, source = None, None
    out["event_s"] = cost
    if not events:
        measured = windows_s[1:]
        out["tok_s_amortized"] = tokens_per_step * EVERY * len(measured) / sum(measured)
        out["amortized_from"] = "measured: no refresh or merge in the run after step 0"
    elif gap and cost is not None:
        out["tok_s_amortized"] = gap * tokens_per_step / (gap * step_s + cost)
        out["amortized_from"] = f"T={gap} steps and one event of {cost:.3g} s ({source})"
    else:
        out["tok_s_amortized"] = None
        out["amortized_from"] = "not separable: the first step holds the compile and the event"
    return out


# -- the planner ---------------------------------------------------------------------------------


def planned(config: Path, overrides: list[str]) -> dict:
    """The planner's prediction (`lowrank-train estimate CONFIG --device cuda --json`), or
    planned_gib None with the reason it is not there."""
    cmd = [sys.executable, "-m", "lowrank_train.cli", "estimate", str(config), "--device", "cuda"]
    proc = subprocess.run(
        [*cmd, "--json", *overrides], capture_output=True, text=True, cwd=ROOT, timeout=600
    )
    if proc.returncode == 0:
        try:
            plan = json.loads(proc.stdout)
            return {
                "planned_gib": plan["total_gib"],
                "planned_fits": plan.get("fits"),
                "planned_components_gib": {
                    k: v / GIB for k, v in plan.get("components", {}).items()
                },
                "planned_suggestions": plan.get("suggestions", []),
                "planned_peak_phase": plan.get("peak_phase"),
            }
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            return {"planned_gib": None, "planned_error": f"unreadable estimate JSON: {e}"}
    tail = (proc.stderr or proc.stdout).strip().splitlines()
    return {"planned_gib": None, "planned_error": tail[-1] if tail else f"exit {proc.returncode}"}


# -- the parent ----------------------------------------------------------------------------------


def build_cases(args, bench: str, names: list[str], work: Path) -> list[dict]:
    """One case per (size, method, accumulation), with its config written under `work`."""
    cases = []
    for size in args.sizes.split(","):
        for accum in (int(a) for a in args.grad_accum.split(",")):
            for name in names:
                per_layer = OURS[name].per_layer if name in OURS else PEERS[name].per_layer
                case = {
                    "bench": bench,
                    "id": f"{size}:{name}:accum{accum}",
                    "size": size,
                    "method": name,
                    "provider": "ours" if name in OURS else PEERS[name].provider,
                    "steps": args.steps or SIZES[size].steps,
                    "grad_accum": accum,
                    # the global norm is not known when a per-layer hook steps: no clipping there
                    "clip": 0.0 if per_layer else args.clip,
                    "compile": args.compile and not (name in PEERS and per_layer),
                    "cap_gib": args.cap_gib,
                    "cache": args.cache,
                    "base": args.base,
                    "call": args.call,
                }
                if args.only and not any(o in case["id"] for o in args.only.split(",")):
                    continue
                if name in OURS:
                    case["set"] = args.set
                    path, overrides = our_config(name, case, work)
                else:
                    base = Path(args.base) if args.base else SIZES[size].base
                    path = compose([base], work / f"{case['id'].replace(':', '_')}.yaml")
                    overrides = common_overrides(case)
                case["config"], case["overrides"] = str(path), overrides
                cases.append(case)
    return cases


def prepare(case: dict, plan: bool, run_unfit: bool) -> dict | None:
    """Before the case runs: the peer's recipe settings, the planner's prediction; a skip
    result when it cannot run (per-layer peers under accumulation, the planner's no-fit)."""
    if case["method"] in PEERS:
        peer = PEERS[case["method"]]
        if peer.per_layer and case["grad_accum"] > 1:
            return {
                "skipped": f"{peer.provider}'s per-layer recipe steps in every micro-batch's "
                "hook: with grad_accum > 1 it would step each micro-batch (wrong)"
            }
        from lowrank_train.errors import ConfigError

        try:
            case["peer"] = peer_settings(peer, case)
        except ConfigError as e:
            return {"skipped": f"the recipe {peer.recipe!r} of this size: {e}"}
        case["plan"] = {"planned_gib": None, "planned_error": "the planner plans our runs only"}
        return None
    case["plan"] = planned(Path(case["config"]), case["overrides"]) if plan else {}
    if not run_unfit and case["plan"].get("planned_fits") is False:
        return {
            "skipped": f"the planner: {case['plan']['planned_gib']:.2f} GiB does not fit "
            f"{case['cap_gib']} GiB; {'; '.join(case['plan']['planned_suggestions'])}"
        }
    return None


def to_row(case: dict, result: dict, extra_metrics: Callable[[dict, dict], dict]) -> dict:
    """The JSON line of a finished (or skipped, failed, out-of-memory) case."""
    size = SIZES[case["size"]]
    res = dict(result)
    per_layer = (
        OURS[case["method"]] if case["provider"] == "ours" else PEERS[case["method"]]
    ).per_layer
    settings = {
        "batch_size": size.batch_size,
        "grad_accum": case["grad_accum"],
        "gradient_checkpointing": size.checkpointing,
        "clip_grad_norm": case["clip"],
        "compile": case["compile"],
        "per_layer": per_layer,
        "steps": case["steps"],
        **res.pop("settings", {}),  # the child's, read from the resolved config, win
        "call": case["call"],
        "config": case["config"],
        "overrides": case["overrides"],
    }
    res.pop("case", None)
    metrics = {**res, **case.get("plan", {})}
    if metrics.get("planned_gib") and metrics.get("peak_gib"):
        metrics["planned_over_measured"] = metrics["planned_gib"] / metrics["peak_gib"]
    metrics.update(extra_metrics(case, metrics))
    return result_line(
        bench=case["bench"],
        case={
            "model": size.preset or "tiny",
            "batch_size": size.batch_size,
            "seq_len": 256 if size.preset else None,
            "cap_gib": case["cap_gib"],
        },
        provider=case["provider"],
        method=case["method"],
        settings=settings,
        metrics=metrics,
    )


def bench_main(
    args,
    script: Path,
    make_cases: Callable[[], list[dict]],
    table: Callable[[list[dict]], str],
    png_name: str,
    title: str,
    extra_metrics: Callable[[dict, dict], dict] | None = None,
) -> None:
    """The benchmarks' shared main: rows from --from-rows, or from running `make_cases()`'s
    cases (--list prints their ids instead), then the README table and the PNG."""
    if args.from_rows:
        rows = read_rows(args.from_rows)
    else:
        cases = make_cases()
        if args.list:
            print("\n".join(c["id"] for c in cases))
            return
        if args.plan_only:
            rows = plan_rows(cases)
            path = write_results("plan", args.device_slug or "cuda-planned", rows, args.out_dir)
            print(plan_table(rows))
            print(f"rows: {path}")
            return
        extra = {"extra_metrics": extra_metrics} if extra_metrics else {}
        rows = run_matrix(
            script,
            cases,
            args.out_dir,
            args.device_slug,
            plan=not args.no_plan,
            run_unfit=args.run_unfit,
            **extra,
        )
    print(table(rows))
    png = plot(rows, args.out_dir / png_name, title)
    if png:
        print(f"plot: {png}")


def plan_rows(cases: list[dict]) -> list[dict]:
    """The planner's verdict on each of our cases (nothing runs), as `bench: plan` rows: the
    README's "which methods fit" table, with the peak phase and, where a case does not fit,
    what would make it."""
    rows = []
    for case in cases:
        if case["provider"] != "ours":
            continue
        size = SIZES[case["size"]]
        rows.append(
            result_line(
                bench="plan",
                case={
                    "model": size.preset,
                    "batch_size": size.batch_size,
                    "seq_len": 256,
                    "cap_gib": case["cap_gib"],
                },
                provider="ours",
                method=case["method"],
                settings={
                    "id": case["id"],
                    "grad_accum": case["grad_accum"],
                    "gradient_checkpointing": size.checkpointing,
                    "planned_for": "cuda",
                    "overrides": case["overrides"],
                },
                metrics=planned(Path(case["config"]), case["overrides"]),
            )
        )
    return rows


def plan_table(rows: list[dict]) -> str:
    """The markdown table of `plan_rows`."""
    lines = [
        "| case | planned GiB | fits the cap | peak phase | largest components (GiB) | "
        "what the planner suggests |",
        "|---|---|---|---|---|---|",
    ]
    for row in rows:
        plan, case_id = row["metrics"], row["settings"]["id"]
        if plan.get("planned_gib") is None:
            lines.append(f"| {case_id} | - | - | - | {plan['planned_error']} | - |")
            continue
        parts = sorted(plan["planned_components_gib"].items(), key=lambda kv: -kv[1])[:3]
        fits = "yes" if plan["planned_fits"] else "**no**"
        lines.append(
            f"| {case_id} | {plan['planned_gib']:.2f} | {fits} | {plan['planned_peak_phase']} | "
            f"{', '.join(f'{k} {v:.2f}' for k, v in parts)} | "
            f"{'; '.join(plan['planned_suggestions']) or '-'} |"
        )
    return "\n".join(lines)


def run_matrix(
    script: Path,
    cases: list[dict],
    out_dir: Path,
    slug: str | None,
    plan: bool = True,
    run_unfit: bool = False,
    extra_metrics: Callable[[dict, dict], dict] = lambda case, metrics: {},
    timeout_s: int = 1800,
) -> list[dict]:
    """Run the cases one process each; append each row to <bench>_<slug>_<date>.jsonl in
    `out_dir` as its case ends, and each child's log to <bench>.log there."""
    rows = []
    bench = cases[0]["bench"] if cases else "train"
    log = out_dir / f"{bench}.log"

    def record(case: dict, result: dict) -> None:
        row = to_row(case, result, extra_metrics)
        rows.append(row)
        path = write_results(bench, slug, [row], out_dir)
        print(f"{case['id']}: {summary_line(row)} -> {path.name}", flush=True)

    for case in cases:
        skip = prepare(case, plan, run_unfit)
        if skip is not None:
            record(case, skip)
            continue
        run_cases(script, [case], timeout_s=timeout_s, log=log, on_result=record)
    return rows


def summary_line(row: dict) -> str:
    m = row["metrics"]
    for key in ("skipped", "oom", "error"):
        if key in m:
            return f"{key}: {m[key]}"
    return " ".join(
        f"{k} {m[k]:.4g}"
        for k in ("tok_s", "tok_s_amortized", "peak_gib", "planned_gib")
        if isinstance(m.get(k), float)
    )


# -- the README table and the PNG ----------------------------------------------------------------


def fmt(value, spec: str = ",.0f") -> str:
    return "-" if value is None else format(value, spec)


def markdown_table(rows: list[dict], columns: list[tuple[str, Callable[[dict], str]]]) -> str:
    """A markdown table, one line per row; `columns` are (header, row -> cell)."""
    lines = [
        "| " + " | ".join(h for h, _ in columns) + " |",
        "|" + "---|" * len(columns),
    ]
    lines += ["| " + " | ".join(cell(r) for _, cell in columns) + " |" for r in rows]
    return "\n".join(lines)


def note(row: dict) -> str:
    m = row["metrics"]
    for key in ("skipped", "oom", "error"):
        if key in m:
            return f"{key}: {str(m[key])[:160]}"
    return ""


def read_rows(paths: list[Path]) -> list[dict]:
    return [json.loads(x) for p in paths for x in p.read_text().splitlines() if x.strip()]


def plot(rows: list[dict], path: Path, title: str) -> Path | None:
    """Bars of peak_gib (with the planner's figure where there is one) and steady tok/s per
    method, one panel pair per model; None where matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no PNG", file=sys.stderr)
        return None
    ran = [r for r in rows if r["metrics"].get("peak_gib") is not None]
    models = list(dict.fromkeys(r["case"]["model"] for r in ran))
    if not models:
        return None
    fig, axes = plt.subplots(
        2, len(models), figsize=(4 + 3 * len(models), 8), squeeze=False, constrained_layout=True
    )
    for col, model in enumerate(models):
        mine = [r for r in ran if r["case"]["model"] == model]
        labels = [label(r) for r in mine]
        y = range(len(mine))
        mem, speed = axes[0][col], axes[1][col]
        mem.barh(y, [r["metrics"]["peak_gib"] for r in mine], color="tab:blue", label="peak_gib")
        planned = [r["metrics"].get("planned_gib") or 0 for r in mine]
        mem.scatter(planned, y, color="black", marker="|", s=200, label="planned_gib", zorder=3)
        mem.axvline(rows[0]["case"]["cap_gib"], color="red", ls="--", label="cap")
        speed.barh(y, [r["metrics"].get("tok_s") or 0 for r in mine], color="tab:green")
        for ax, xlabel in ((mem, "peak GiB"), (speed, "steady tok/s")):
            ax.set_yticks(list(y), labels, fontsize=7)
            ax.set_xlabel(xlabel)
            ax.set_title(model)
        mem.legend(fontsize=7)
    fig.suptitle(title)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def label(row: dict) -> str:
    s = row["settings"]
    accum = f" x{s['grad_accum']}" if s.get("grad_accum", 1) > 1 else ""
    call = f" [{s['call']}]" if s.get("call") else ""  # rows of several calls stay apart
    return f"{row['provider']}: {row['method']}{accum}{call}"


def add_common_arguments(ap, sizes: str, steps_help: str) -> None:
    ap.add_argument("--cache", help="token cache dir (vocab 32000), built on any machine")
    ap.add_argument("--sizes", default=sizes, help=f"comma list of {', '.join(SIZES)}")
    ap.add_argument(
        "--only",
        default="",
        help="keep cases whose id (size:method:accumN) "
        "contains one of these comma-separated strings",
    )
    ap.add_argument("--steps", type=int, default=0, help=steps_help)
    ap.add_argument("--clip", type=float, default=1.0, help="clip of whole-model steps")
    ap.add_argument("--cap-gib", type=float, default=CAP_GIB)
    ap.add_argument(
        "--out-dir",
        type=Path,
        default=ROOT / "benchmarks" / "results",
        help="rows (.jsonl), the children's log and the PNG go here ($OUT on the GPU)",
    )
    ap.add_argument("--device-slug", help="results file device word (default: from the device)")
    ap.add_argument("--call", default="call1", help="label of this call, in every row")
    ap.add_argument("--base", help="run file the cases build on instead of the size's")
    ap.add_argument(
        "--set", nargs="*", default=[], metavar="key=value", help="extra overrides of our runs"
    )
    ap.add_argument("--no-plan", action="store_true", help="skip the planner")
    ap.add_argument(
        "--run-unfit",
        action="store_true",
        help="run cases the planner says do not fit (they record the OOM)",
    )
    ap.add_argument("--no-compile", dest="compile", action="store_false")
    ap.add_argument(
        "--from-rows",
        nargs="*",
        type=Path,
        help="no runs: the table and PNG from these results files",
    )
    ap.add_argument("--list", action="store_true", help="print the cases and exit")
    ap.add_argument(
        "--plan-only",
        action="store_true",
        help="print the planner's verdict on each of our cases (CPU is enough) and exit",
    )
