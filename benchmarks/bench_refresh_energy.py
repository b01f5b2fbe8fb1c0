"""Does the fast refresh lose anything on real gradients? (issue 15, part 3.) A run of ours is
trained for `--steps` steps; then the gradient of one micro-batch of every projected tensor is
recorded twice, `--gap` steps apart (a refresh and the next one). For each tensor at the later
step, the share of the gradient's energy kept by the top-r basis,
    captured(B) = ||B^T A||_F^2 / ||A||_F^2,
is compared with the exact SVD's: the fast finder cold (range finder) and warm (subspace
iteration from the earlier step's basis, as the optimizer warm-starts it). One JSON line per
finder (bench "refresh_energy") with the worst and median ratio over the tensors.

    python benchmarks/bench_refresh_energy.py [--config configs/runs/quickstart.yaml]
        [--rank 128] [--steps 100] [--gap 50] [--set key=value ...]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import result_line, write_results  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def recorded_gradients(trainer) -> dict:
    """name -> fp32 gradient of one micro-batch for every tensor a projector would take; the
    run's own gradients are left as they were (none: the loop zeroes them after each step)."""
    import torch

    from lowrank_train.data import split_block
    from lowrank_train.optim import projectable_tensors

    tensors = projectable_tensors(trainer.model)
    inputs, labels = split_block(next(trainer.loader).to(trainer.env.device))
    loss = trainer.loss_fn(trainer.wrapped, inputs, labels)
    grads = torch.autograd.grad(loss, list(tensors.values()))
    return {name: g.float() for name, g in zip(tensors, grads, strict=True)}


def ratios(early: dict, late: dict, rank: int, seed: int) -> dict[str, list[float]]:
    """Per finder, captured(finder) / captured(exact) for every tensor at the later step."""
    from lowrank_train.projectors.subspace import captured_energy, side_of, svd_basis
    from lowrank_train.seeding import generator

    out: dict[str, list[float]] = {"fast cold": [], "fast warm": []}
    for name, grad in late.items():
        side = side_of(tuple(grad.shape))
        exact = captured_energy(grad, svd_basis(grad, side, rank, "exact", None, []), side)
        previous = svd_basis(early[name], side, rank, "exact", None, [])
        gen = generator(seed, name, "refresh", 1)
        cold = svd_basis(grad, side, rank, "fast", None, gen)
        warm = svd_basis(grad, side, rank, "fast", previous, generator(seed, name, "refresh", 1))
        out["fast cold"].append(captured_energy(grad, cold, side) / exact)
        out["fast warm"].append(captured_energy(grad, warm, side) / exact)
    return out


def overrides(steps: int, out_dir: str, extra: list[str]) -> list[str]:
    """`steps` steps (a run file may budget tokens instead), no evaluation or checkpoints,
    then the user's."""
    return [
        "train.tokens=0",
        f"train.steps={steps}",
        "eval.every=0",
        "checkpoint.every=0",
        "checkpoint.at_end=false",
        f"out_dir={out_dir}",
        "name=energy",
        *extra,
    ]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", type=Path, default=ROOT / "configs" / "runs" / "quickstart.yaml")
    ap.add_argument("--rank", type=int, default=128)
    ap.add_argument("--steps", type=int, default=100, help="training steps before the first record")
    ap.add_argument("--gap", type=int, default=50, help="steps between the two records")
    ap.add_argument("--set", nargs="*", default=[], metavar="key=value")
    ap.add_argument("--out-dir", type=Path, default=ROOT / "benchmarks" / "results")
    ap.add_argument("--device-slug")
    args = ap.parse_args()

    from lowrank_train.cli import setup_logging
    from lowrank_train.resolve import load_run
    from lowrank_train.trainer import Trainer

    setup_logging(0)
    total = args.steps + args.gap
    cfg, _ = load_run(args.config, overrides(total, tempfile.mkdtemp(prefix="energy_"), args.set))
    trainer = Trainer(cfg)
    trainer.model.train()
    records = []
    for step in range(1, total + 1):
        trainer.step(cfg.train.clip_grad_norm)
        if step in (args.steps, total):
            records.append(recorded_gradients(trainer))
            print(f"recorded the gradients after step {step}", flush=True)
    found = ratios(*records, rank=args.rank, seed=cfg.train.seed)
    rows = []
    for finder, values in found.items():
        metrics = {
            "worst_ratio": round(min(values), 5),
            "median_ratio": round(statistics.median(values), 5),
            "tensors": len(values),
        }
        print(
            f"{finder}: captured energy / exact's, worst {metrics['worst_ratio']:.4f}, "
            f"median {metrics['median_ratio']:.4f} over {len(values)} tensors"
        )
        rows.append(
            result_line(
                bench="refresh_energy",
                case={"model": cfg.model.preset, "rank": args.rank, "config": args.config.name},
                provider="ours",
                method=finder,
                settings={
                    "recorded_after_steps": [args.steps, total],
                    "batch_size": cfg.train.batch_size,
                    "seq_len": cfg.model.seq_len,
                    "optimizer": cfg.optim.name,
                    "projector": cfg.optim.projector.name,
                    "overrides": args.set,
                },
                metrics=metrics,
            )
        )
    print(f"rows: {write_results('refresh_energy', args.device_slug, rows, args.out_dir)}")


if __name__ == "__main__":
    main()
