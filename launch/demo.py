"""Muon vs AdamW on a tiny byte-level GPT, on CPU, without distribution: the README's main job.

Both optimizers train the same model from the same init on the same batches (Python's
standard library as bytes) under the same warmup + cosine schedule and the same lr / wd
convention: one lr drives both parts of muon_ds.Muon (Moonlight's 0.2 * sqrt(max(A, B))
update scale is what makes that work), decoupled wd 0.1 on every matrix and none on
gains and biases, and the AdamW baseline uses the hyper-parameters of Muon's AdamW part
everywhere. So the only difference is how the hidden matrices are updated.

Each optimizer sweeps its own lr grid with short runs (the defaults bracket where each
was best on this model; a best lr on a grid's edge is flagged), then both train for the
same number of steps at their best lr. Runs are independent, so they run in parallel
worker processes with one thread each.

Reported: both loss curves side by side, the final validation losses at equal steps,
and the first step at which Muon's validation loss reaches AdamW's final one (on a
fixed validation set of held-out files, evaluated every ``--eval-every`` steps).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import multiprocessing
import os
import platform
import time
from concurrent.futures import Executor, ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from queue import Empty, Queue

import matplotlib
import torch
from tqdm import tqdm

import muon_ds
from muon_ds.testing.corpus import stdlib_corpus, val_batch
from muon_ds.testing.tiny_gpt import GPTConfig, init_model
from muon_ds.testing.training import EvalPoint, OptimizerFactory, TrainConfig, decay_groups, train

matplotlib.use("Agg")  # headless: the demo only writes a PNG
import matplotlib.pyplot as plt

WEIGHT_DECAY = 0.1
"""Moonlight's wd, on every matrix (embeddings and head too) for both optimizers."""

ADAMW_BETAS = (0.9, 0.95)
"""Moonlight's AdamW betas, which are also muon_ds's defaults for its AdamW part."""

ADAMW_EPS = 1e-8
"""Moonlight's AdamW eps, also muon_ds's default."""


def make_muon(model: torch.nn.Module, lr: float) -> torch.optim.Optimizer:
    """muon_ds.Muon: Muon on hidden matrices, its AdamW part on embeddings, head, gains."""
    return muon_ds.Muon(decay_groups(model, WEIGHT_DECAY), lr=lr)


def make_adamw(model: torch.nn.Module, lr: float) -> torch.optim.Optimizer:
    """torch.optim.AdamW with Muon's groups and the hyper-parameters of its AdamW part."""
    return torch.optim.AdamW(
        decay_groups(model, WEIGHT_DECAY), lr=lr, betas=ADAMW_BETAS, eps=ADAMW_EPS
    )


OPTIMIZERS: dict[str, OptimizerFactory] = {"Muon": make_muon, "AdamW": make_adamw}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Muon vs AdamW on a tiny byte-level GPT, on CPU, without distribution.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--steps", type=int, default=300, help="steps of each final run")
    parser.add_argument("--sweep-steps", type=int, default=75, help="steps of each sweep run")
    parser.add_argument(
        "--muon-lrs",
        type=float,
        nargs="+",
        default=[1.2e-2, 2.4e-2, 4.8e-2],
        help="peak lrs swept for Muon",
    )
    parser.add_argument(
        "--adamw-lrs",
        type=float,
        nargs="+",
        default=[7.5e-4, 1.5e-3, 3e-3],
        help="peak lrs swept for AdamW",
    )
    parser.add_argument("--d-model", type=int, default=GPTConfig.d_model)
    parser.add_argument("--n-layers", type=int, default=GPTConfig.n_layers)
    parser.add_argument("--n-heads", type=int, default=GPTConfig.n_heads)
    parser.add_argument("--context", type=int, default=GPTConfig.context)
    parser.add_argument("--batch-size", type=int, default=TrainConfig.batch_size)
    parser.add_argument("--eval-every", type=int, default=10, help="steps between evaluations")
    parser.add_argument("--val-seqs", type=int, default=64, help="sequences in the validation set")
    parser.add_argument("--seed", type=int, default=0, help="model init and batch order")
    parser.add_argument("--out", type=Path, default=Path("out"), help="output directory")
    return parser.parse_args(argv)


@dataclass(frozen=True)
class Job:
    """One training run, executed in a worker process."""

    optimizer: str
    """Key of ``OPTIMIZERS``."""

    model: GPTConfig
    """Shape of the model."""

    run: TrainConfig
    """Steps, lr, schedule and seed."""

    val_seqs: int
    """Sequences in the fixed validation set."""


@dataclass(frozen=True)
class JobResult:
    """A run's loss curve and what it cost."""

    points: list[EvalPoint]
    """Losses at every evaluation."""

    cpu_seconds: float
    """CPU time of the worker for this run."""

    wall_seconds: float
    """Wall time of this run."""


def run_job(job: Job, progress: Queue) -> JobResult:
    """Train one run on one thread, reporting ``(optimizer, lr, loss)`` after every step.

    One thread per run, runs in parallel across cores: the tiny matrices here scale
    poorly over threads, and the numbers do not depend on the machine's core count.
    """
    torch.set_num_threads(1)
    corpus = stdlib_corpus()
    val = val_batch(corpus.val, n_seqs=job.val_seqs, context=job.model.context)
    cpu, wall = time.process_time(), time.perf_counter()
    points = train(
        job.model,
        job.run,
        corpus,
        OPTIMIZERS[job.optimizer],
        val,
        lambda _, loss: progress.put((job.optimizer, job.run.lr, loss)),
    )
    return JobResult(points, time.process_time() - cpu, time.perf_counter() - wall)


def run_jobs(pool: Executor, progress: Queue, jobs: list[Job], bar: tqdm) -> list[JobResult]:
    """Run ``jobs`` on ``pool``, advancing ``bar`` as their steps complete."""
    futures = [pool.submit(run_job, job, progress) for job in jobs]
    counted = 0
    while not all(f.done() for f in futures) or not progress.empty():
        try:
            optimizer, lr, loss = progress.get(timeout=0.2)
        except Empty:
            continue
        counted += 1
        bar.update(1)
        bar.set_postfix_str(f"{optimizer} lr={lr:g} loss={loss:.3f}", refresh=False)
    bar.update(sum(job.run.steps for job in jobs) - counted)  # diverged runs stop early
    return [f.result() for f in futures]


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    model_cfg = GPTConfig(
        context=args.context, d_model=args.d_model, n_layers=args.n_layers, n_heads=args.n_heads
    )
    corpus = stdlib_corpus()
    grids = {"Muon": args.muon_lrs, "AdamW": args.adamw_lrs}
    sweep_jobs = [
        Job(
            name,
            model_cfg,
            _run_config(args, args.sweep_steps, lr, eval_every=args.sweep_steps),
            args.val_seqs,
        )
        for name, lrs in grids.items()
        for lr in lrs
    ]
    workers = min(len(os.sched_getaffinity(0)), len(sweep_jobs))
    n_params = sum(p.numel() for p in init_model(model_cfg, args.seed).parameters())
    print(
        f"TinyGPT, {n_params / 1e6:.2f}M params: {model_cfg}\n"
        f"corpus: Python {platform.python_version()} stdlib, {corpus.train.numel():,} train bytes "
        f"({len(corpus.train_files)} files), {corpus.val.numel():,} validation bytes "
        f"({len(corpus.val_files)} files); validation set {args.val_seqs} x {model_cfg.context}\n"
        f"sweep: Muon lrs {args.muon_lrs}, AdamW lrs {args.adamw_lrs}, {args.sweep_steps} steps "
        f"each; final: {args.steps} steps; "
        f"batch {args.batch_size}; {workers} worker processes x 1 thread"
    )

    total = len(sweep_jobs) * args.sweep_steps + len(OPTIMIZERS) * args.steps
    context = multiprocessing.get_context("spawn")
    start = time.perf_counter()
    with (
        context.Manager() as manager,
        ProcessPoolExecutor(workers, mp_context=context) as pool,
        tqdm(total=total, unit="step", dynamic_ncols=True) as bar,
    ):
        progress = manager.Queue()
        bar.set_description("lr sweep")
        sweep_results = run_jobs(pool, progress, sweep_jobs, bar)
        sweep: dict[str, dict[float, float]] = {name: {} for name in OPTIMIZERS}
        for job, result in zip(sweep_jobs, sweep_results, strict=True):
            sweep[job.optimizer][job.run.lr] = result.points[-1].val_loss
        best_lr = {name: min(losses, key=losses.__getitem__) for name, losses in sweep.items()}
        final_jobs = [
            Job(name, model_cfg, _run_config(args, args.steps, lr, args.eval_every), args.val_seqs)
            for name, lr in best_lr.items()
        ]
        bar.set_description("final runs")
        final_results = run_jobs(pool, progress, final_jobs, bar)
    wall = time.perf_counter() - start
    curves = {job.optimizer: r.points for job, r in zip(final_jobs, final_results, strict=True)}

    summary = summarise(curves, best_lr, grids)
    print_report(curves, sweep, summary, args.eval_every)
    args.out.mkdir(parents=True, exist_ok=True)
    plot(curves, summary, args.out / "demo_loss.png")
    record = {
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "model": dataclasses.asdict(model_cfg) | {"params": n_params},
        "final_run": {k: v for k, v in dataclasses.asdict(final_jobs[0].run).items() if k != "lr"},
        "corpus": {
            "source": f"Python {platform.python_version()} standard library",
            "train_bytes": corpus.train.numel(),
            "val_bytes": corpus.val.numel(),
            "train_files": list(corpus.train_files),
            "val_files": list(corpus.val_files),
        },
        "sweep_val_loss": {
            name: {str(lr): _json_float(loss) for lr, loss in losses.items()}
            for name, losses in sweep.items()
        },
        **summary,
        "final_val_loss": {k: _json_float(v) for k, v in summary["final_val_loss"].items()},
        "curves": {name: [_json_point(p) for p in points] for name, points in curves.items()},
        "workers": workers,
        "runs": [
            {
                "phase": phase,
                "optimizer": job.optimizer,
                "lr": job.run.lr,
                "steps": job.run.steps,
                "cpu_seconds": result.cpu_seconds,
                "wall_seconds": result.wall_seconds,
            }
            for phase, jobs, results in (
                ("sweep", sweep_jobs, sweep_results),
                ("final", final_jobs, final_results),
            )
            for job, result in zip(jobs, results, strict=True)
        ],
        "wall_seconds": wall,
    }
    (args.out / "demo_results.json").write_text(json.dumps(record, indent=2) + "\n")
    print(
        f"\nwrote {args.out / 'demo_loss.png'} and {args.out / 'demo_results.json'}; "
        f"training took {wall:.0f} s"
    )


def _run_config(args: argparse.Namespace, steps: int, lr: float, eval_every: int) -> TrainConfig:
    """Sweep and final runs share everything but length, lr and evaluation frequency."""
    return TrainConfig(
        steps=steps,
        lr=lr,
        batch_size=args.batch_size,
        warmup_steps=max(1, steps // 10),
        eval_every=eval_every,
        seed=args.seed,
    )


def summarise(
    curves: dict[str, list[EvalPoint]],
    best_lr: dict[str, float],
    grids: dict[str, list[float]],
) -> dict:
    """The headline numbers: lrs, final losses at equal steps, Muon's step to AdamW's loss."""
    adamw_final = curves["AdamW"][-1].val_loss
    reach = None
    if math.isfinite(adamw_final):
        reach = next((p.step for p in curves["Muon"][1:] if p.val_loss <= adamw_final), None)
    final_step = max(points[-1].step for points in curves.values())  # unless both diverged
    return {
        "best_lr": best_lr,
        "best_lr_at_grid_edge": {
            name: len(grids[name]) > 1 and lr in (min(grids[name]), max(grids[name]))
            for name, lr in best_lr.items()
        },
        "final_step": final_step,
        "final_val_loss": {name: points[-1].val_loss for name, points in curves.items()},
        "muon_step_reaching_adamw_final_val_loss": reach,
        "adamw_steps_per_muon_step": None if reach is None else final_step / reach,
    }


def print_report(
    curves: dict[str, list[EvalPoint]],
    sweep: dict[str, dict[float, float]],
    summary: dict,
    eval_every: int,
) -> None:
    """The sweep, the two curves side by side (about 15 rows) and the headline numbers."""
    print("\nsweep (validation loss at the end of each sweep run):")
    for name, losses in sweep.items():
        cells = "  ".join(f"lr {lr:g}: {loss:.4f}" for lr, loss in losses.items())
        edge = (
            f"  (on the grid's edge: widen --{name.lower()}-lrs)"
            if summary["best_lr_at_grid_edge"][name]
            else ""
        )
        print(f"  {name:5}  {cells}  -> {summary['best_lr'][name]:g}{edge}")

    by_step = {name: {p.step: p for p in points} for name, points in curves.items()}
    final_step = summary["final_step"]
    row_every = eval_every * max(1, round(final_step / eval_every / 15))
    steps = sorted({s for c in by_step.values() for s in c if s % row_every == 0} | {final_step})
    print(
        f"\nloss in nats/byte (ln 256 = {math.log(256):.3f}); "
        f"train = mean of the {eval_every} steps before the evaluation"
    )
    print(
        f"{'step':>6} | {'Muon train':>10} {'Muon val':>9} | {'AdamW train':>11} {'AdamW val':>9}"
    )
    for step in steps:
        cells = []
        for name in ("Muon", "AdamW"):
            p = by_step[name].get(step)
            cells.append(
                f"{_fmt(p.train_loss if p else math.nan):>{len(name) + 6}} "
                f"{_fmt(p.val_loss if p else math.nan):>9}"
            )
        print(f"{step:>6} | {cells[0]} | {cells[1]}")

    final = summary["final_val_loss"]
    reach = summary["muon_step_reaching_adamw_final_val_loss"]
    print(
        f"\nfinal validation loss after {final_step} steps: "
        f"Muon {final['Muon']:.4f} (lr {summary['best_lr']['Muon']:g}), "
        f"AdamW {final['AdamW']:.4f} (lr {summary['best_lr']['AdamW']:g})"
    )
    if not math.isfinite(final["AdamW"]):
        print(f"AdamW diverged at step {curves['AdamW'][-1].step}: there is no loss to reach")
    elif reach is None:
        print(
            f"Muon did not reach AdamW's final validation loss ({final['AdamW']:.4f}) "
            f"within {final_step} steps"
        )
    else:
        print(
            f"Muon first reached AdamW's final validation loss ({final['AdamW']:.4f}) "
            f"at step {reach} of {final_step}: "
            f"{summary['adamw_steps_per_muon_step']:.2f}x fewer steps"
        )


def plot(curves: dict[str, list[EvalPoint]], summary: dict, path: Path) -> None:
    """Validation (solid) and training (faint) loss per step for both optimizers."""
    fig, ax = plt.subplots(figsize=(8, 5))
    for name, color in (("Muon", "tab:blue"), ("AdamW", "tab:orange")):
        points = curves[name]
        lr = summary["best_lr"][name]
        ax.plot(
            [p.step for p in points],
            [p.val_loss for p in points],
            color=color,
            label=f"{name} val (lr {lr:g})",
        )
        ax.plot(
            [p.step for p in points[1:]],
            [p.train_loss for p in points[1:]],
            color=color,
            alpha=0.35,
            label=f"{name} train",
        )
    adamw_final = summary["final_val_loss"]["AdamW"]
    reach = summary["muon_step_reaching_adamw_final_val_loss"]
    if math.isfinite(adamw_final):
        ax.axhline(
            adamw_final, color="gray", linestyle=":", label=f"AdamW final val {adamw_final:.3f}"
        )
    if reach is not None:
        ax.axvline(reach, color="tab:blue", linestyle=":", label=f"Muon reaches it at step {reach}")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (nats/byte)")
    ax.set_ylim(top=min(math.log(256) + 0.2, ax.get_ylim()[1]))
    ax.set_title("TinyGPT on Python's standard library: muon_ds.Muon vs AdamW")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _fmt(value: float) -> str:
    return "-" if math.isnan(value) else f"{value:.4f}"


def _json_point(point: EvalPoint) -> dict[str, float | None]:
    return {
        "step": point.step,
        "train_loss": _json_float(point.train_loss),
        "val_loss": _json_float(point.val_loss),
    }


def _json_float(value: float) -> float | None:
    """JSON has no NaN or Infinity: an undefined or diverged loss is written as null."""
    return value if math.isfinite(value) else None


if __name__ == "__main__":
    main()
