"""`lowrank-train`: argument parsing and exit codes only; the work is in the modules it calls.

Exit codes: 0 done (or stopped by a signal after saving), 2 bad input (one line, no
traceback), 3 stopped on a non-finite loss, 4 out of memory (one line with the planner's
breakdown and suggestions; the last good checkpoint is kept), 1 anything else.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from lowrank_train.errors import NonFiniteLossError, OutOfMemory, UserError

log = logging.getLogger("lowrank_train")

SAMPLE_PROMPTS = ["The history of the city", "KING HENRY.", "And God said unto"]


def setup_logging(rank: int, log_file: Path | None = None) -> None:
    """One console handler (rank 0 at INFO, others at WARNING) and the run's train.log."""
    root = logging.getLogger()
    root.handlers.clear()
    fmt = logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S")
    console = logging.StreamHandler(sys.stderr)
    console.setFormatter(fmt)
    root.addHandler(console)
    root.setLevel(logging.INFO if rank == 0 else logging.WARNING)
    if log_file is not None and rank == 0:
        log_file.parent.mkdir(parents=True, exist_ok=True)
        handler = logging.FileHandler(log_file)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        root.addHandler(handler)
    for noisy in ("httpx", "datasets", "transformers"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def cmd_train(args: argparse.Namespace) -> int:
    from lowrank_train.resolve import load_run

    cfg, _ = load_run(args.config, args.overrides)
    rank = int(os.environ.get("RANK", "0"))
    setup_logging(rank, cfg.run_dir / "train.log")
    from lowrank_train.models import generate_samples
    from lowrank_train.trainer import train

    result = train(cfg, resume=args.resume)
    if rank == 0 and result.progress.step == result.summary["total_steps"] and args.samples:
        for text in generate_samples(
            result.model, result.data.tokenizer_path, SAMPLE_PROMPTS, args.samples, cfg.train.seed
        ):
            log.info("sample: %s", " ".join(text.split()))
    if rank == 0:
        s = result.summary
        log.info(
            "done: %d steps, %s tokens, val_loss %.4f (ppl %.2f), %.0f tok/s, peak %.2f GiB "
            "(planned %.2f), %s",
            s["step"],
            f"{s['tokens']:,}",
            s["final_val_loss"],
            s["final_val_ppl"],
            s["tok_s"],
            s["peak_gib"],
            s["planned_gib"],
            result.run_dir,
        )
    return 0


def cmd_estimate(args: argparse.Namespace) -> int:
    from lowrank_train.planner import plan_run
    from lowrank_train.resolve import load_run

    cfg, _ = load_run(args.config, args.overrides)
    plan = plan_run(cfg, args.device)
    print(json.dumps(plan.to_json(str(args.config)), indent=2) if args.json else plan.table())
    return 0


def cmd_methods(args: argparse.Namespace) -> int:
    from lowrank_train.optim import OPTIMIZERS
    from lowrank_train.parameterizations import PARAMETERIZATIONS
    from lowrank_train.projectors import PROJECTORS
    from lowrank_train.resolve import supported_combinations

    rows = [
        ("parameterizations (weights.name)", PARAMETERIZATIONS),
        ("projectors (optim.projector.name)", PROJECTORS),
        ("optimizers (optim.name)", OPTIMIZERS),
    ]
    for title, registry in rows:
        print(f"{title}:")
        for cls in registry:
            # the class's docstring, else its module's (one file per method)
            doc = cls.__doc__ or sys.modules[cls.__module__].__doc__ or ""
            print(f"  {cls.name:<14} {doc.strip().splitlines()[0] if doc.strip() else ''}")
    print("supported combinations (weights + projector: optimizers; those validate accepts):")
    by_pair: dict[tuple[str, str], list[str]] = {}
    for weights, projector, optimizer in supported_combinations():
        by_pair.setdefault((weights, projector), []).append(optimizer)
    for (weights, projector), optimizers in by_pair.items():
        print(f"  {weights + ' + ' + projector:<28} {', '.join(optimizers)}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    setup_logging(0)
    from lowrank_train.export import export_checkpoint

    out = export_checkpoint(Path(args.source), Path(args.out_dir))
    log.info("exported a dense LlamaForCausalLM and its tokenizer to %s", out)
    return 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lowrank-train", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="train (or resume) a run from a YAML config")
    t.add_argument("config", help="run config, e.g. configs/runs/quickstart.yaml")
    t.add_argument(
        "overrides",
        nargs="*",
        metavar="key=value",
        help="e.g. train.lr=3e-4 model.preset=llama_60m",
    )
    t.add_argument(
        "--resume",
        metavar="latest|DIR",
        help="resume from the newest valid checkpoint or a directory",
    )
    t.add_argument(
        "--samples",
        type=int,
        default=48,
        metavar="N",
        help="tokens of generated text per prompt after a finished run (0 = none)",
    )
    t.set_defaults(func=cmd_train)
    est = sub.add_parser(
        "estimate", help="plan a run's peak memory (per component and phase) and whether it fits"
    )
    est.add_argument("config", help="run config")
    est.add_argument(
        "overrides", nargs="*", metavar="key=value", help="e.g. model.gradient_checkpointing=true"
    )
    est.add_argument(
        "--device",
        choices=("cuda", "cpu"),
        default="cuda",
        help="the machine to plan for (this one need not have it)",
    )
    est.add_argument("--json", action="store_true", help="print DESIGN.md's JSON")
    est.set_defaults(func=cmd_estimate)
    m = sub.add_parser(
        "methods", help="list the registered parameterizations, projectors and optimizers"
    )
    m.set_defaults(func=cmd_methods)
    e = sub.add_parser(
        "export", help="write a dense HF model and tokenizer from a run or checkpoint directory"
    )
    e.add_argument("source", metavar="RUN_DIR|CKPT_DIR")
    e.add_argument("out_dir", metavar="OUT_DIR")
    e.set_defaults(func=cmd_export)
    return p


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    p = parser()
    # key=value overrides may follow options (`train x.yaml --resume latest train.lr=1e-3`); argparse
    # has already closed the positional list by then, so they come back as unknown arguments.
    args, extra = p.parse_known_args(argv)
    with_overrides = ("train", "estimate")
    stray = [
        a for a in extra if a.startswith("-") or "=" not in a or args.command not in with_overrides
    ]
    if stray:
        p.error(f"unrecognized arguments: {' '.join(stray)}")
    if args.command in with_overrides:
        args.overrides = [*args.overrides, *extra]
    try:
        return args.func(args)
    except UserError as e:
        print(f"lowrank-train: {e}", file=sys.stderr)
        return e.exit_code
    except (NonFiniteLossError, OutOfMemory) as e:
        log.error("%s", e)
        return e.exit_code


if __name__ == "__main__":
    sys.exit(main())
