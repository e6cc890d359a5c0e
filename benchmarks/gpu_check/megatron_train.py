"""GPU check, part e: Megatron's own ``pretrain()`` with muon_ds, Adam and Megatron's Muon.

Each run is the project's Megatron entry, ``launch/megatron/pretrain_gpt.py``, started as a
user starts it (``torch.distributed.run``, one rank) in its own time box: a small dense GPT
and a small MoE (SequentialMLP experts, the alltoall token dispatcher), bf16, Megatron's
local layer spec (no Transformer Engine or apex on the GPU image), with three optimizers:
``--optimizer muon --use-distributed-optimizer`` (muon_ds), ``--optimizer adam
--use-distributed-optimizer`` and ``--muon-impl megatron`` (Megatron's own layer-wise
Muon). Both Muons get Moonlight's settings from ``launch/megatron/moonlight_flags.sh``.

Everything is read from what Megatron prints: the loss and the elapsed time of every
iteration, the ``optimizer`` timer (``--timing-log-level 1``, which Megatron logs at
INFO), peak memory (its "memory (MB)" report, ``torch.cuda.max_memory_allocated``), and
muon_ds's own count of orthogonalised matrices. Times are medians over the iterations
after the second: Megatron's first two reports include start-up (the first is not
reset), and the first muon_ds step autotunes the Triton kernel.

Checks (``ok``): every muon_ds run finishes, logs a finite loss at every step that ends
below the first, and orthogonalises each logical matrix once per step. Adam and Megatron's
Muon are measured for comparison only: a failure there is recorded, not a failed check.
``torch.compile`` is disabled in the runs (Megatron's jit fuser would otherwise compile
in every process) so start-up stays short. A run that would start with too little of the
part's budget left is skipped and said so. ``--dry-run``: CPU ranks (gloo), a toy model,
4 steps, fewer runs.

    python -m benchmarks.gpu_check.megatron_train --out DIR [--dry-run]
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import re
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from benchmarks.gpu_check import PartResult, device_name, markdown_table, write_result
from muon_ds.testing.corpus import stdlib_corpus
from muon_ds.testing.ports import free_port

ROOT = Path(__file__).resolve().parents[2]
PART = "megatron_train"


@dataclass(frozen=True)
class Model:
    """One model of the comparison, as ``pretrain_gpt.py`` flags."""

    name: str
    flags: tuple[str, ...]
    muon_matrices: int
    """Logical matrices muon_ds orthogonalises per step (Q, K, V, proj, gate, up, fc2 per
    dense layer; Q, K, V, proj, router and gate, up, fc2 per expert in a MoE layer)."""


@dataclass(frozen=True)
class Optimizer:
    """One optimizer of the comparison."""

    name: str
    flags: tuple[str, ...]
    checked: bool
    """Its runs are the part's checks (muon_ds); the others are measured only."""


@dataclass(frozen=True)
class Plan:
    """What one mode (GPU or dry run) runs, and within which time."""

    models: tuple[Model, ...]
    runs: tuple[tuple[str, str], ...]
    """(model, optimizer) names in the order they run: the checked runs first, so that a
    slow start-up costs the comparison runs, not the checks."""
    steps: int
    device_flags: tuple[str, ...]
    lr: tuple[float, float]
    """Peak and final learning rate (cosine decay after 2 warm-up steps)."""
    budget_s: float
    """The whole part; the driver's box for it must be longer."""
    run_limit_s: float
    """One run's time box (cut to what is left of the budget)."""
    min_start_s: float
    """A run with less budget left than this is skipped instead of started."""


def dense_flags(layers: int, hidden: int, ffn: int, heads: int, groups: int, seq: int) -> list[str]:
    """A Llama-like GPT: GQA, SwiGLU, RMSNorm, RoPE, no biases, untied byte embeddings."""
    return [
        *("--num-layers", str(layers), "--hidden-size", str(hidden)),
        *("--ffn-hidden-size", str(ffn), "--num-attention-heads", str(heads)),
        *("--group-query-attention", "--num-query-groups", str(groups)),
        *("--swiglu", "--normalization", "RMSNorm", "--disable-bias-linear"),
        *("--position-embedding-type", "rope", "--untie-embeddings-and-output-weights"),
        *("--seq-length", str(seq), "--max-position-embeddings", str(seq)),
    ]


def moe_flags(experts: int, expert_ffn: int, dispatcher: str) -> list[str]:
    """Every MLP a MoE layer of SequentialMLP experts (grouped GEMM needs TE or a package
    the GPU image lacks), top-2 routing with the auxiliary load-balancing loss."""
    return [
        *("--num-experts", str(experts), "--moe-ffn-hidden-size", str(expert_ffn)),
        *("--moe-router-topk", "2", "--moe-aux-loss-coeff", "1e-2"),
        *("--moe-token-dispatcher-type", dispatcher),
    ]


def models(dry_run: bool) -> tuple[Model, Model]:
    """Dense and MoE: 4 layers at hidden 1024 on the GPU (about 45M and 80M parameters);
    a toy of train_cpu.sh's size on the CPU, where the alltoall dispatcher would need CUDA
    streams, so it takes allgather."""
    if dry_run:
        layers, experts = 2, 4
        dense = dense_flags(layers, hidden=64, ffn=128, heads=4, groups=2, seq=64)
        moe = [*dense, *moe_flags(experts, expert_ffn=48, dispatcher="allgather")]
    else:
        layers, experts = 4, 8
        dense = dense_flags(layers, hidden=1024, ffn=2816, heads=16, groups=4, seq=1024)
        moe = [*dense, *moe_flags(experts, expert_ffn=704, dispatcher="alltoall")]
    return (
        Model("dense", tuple(dense), layers * (3 + 1 + 2 + 1)),
        Model(f"moe {experts} experts", tuple(moe), layers * (3 + 1 + 1 + 3 * experts)),
    )


OPTIMIZERS = (
    Optimizer("muon_ds", ("--optimizer", "muon", "--use-distributed-optimizer"), True),
    Optimizer("adam", ("--optimizer", "adam", "--use-distributed-optimizer"), False),
    Optimizer(
        "megatron muon",
        ("--optimizer", "muon", "--use-distributed-optimizer", "--muon-impl", "megatron"),
        False,
    ),
)
NO_FUSED_KERNELS = (
    *("--transformer-impl", "local", "--no-rope-fusion", "--no-masked-softmax-fusion"),
    *("--no-bias-swiglu-fusion", "--no-bias-dropout-fusion"),
    *("--no-gradient-accumulation-fusion", "--no-persist-layer-norm"),
)
"""Megatron's fused kernels come from Transformer Engine, apex or its own C++ build, none
of which the GPU image (or the CPU) has."""


def plan(dry_run: bool) -> Plan:
    """The six runs in 130 s on the GPU (the driver boxes the part at 140 s); four toy
    runs on CPU ranks, as ``launch/megatron/train_cpu.sh`` starts them."""
    dense, moe = models(dry_run)
    if dry_run:
        return Plan(
            models=(dense, moe),
            runs=(
                (dense.name, "muon_ds"),
                (moe.name, "muon_ds"),
                (dense.name, "adam"),
                (dense.name, "megatron muon"),
            ),
            steps=4,
            device_flags=("--cpu", "--distributed-backend", "gloo", "--use-cpu-initialization"),
            lr=(2e-2, 2e-3),
            budget_s=540.0,
            run_limit_s=180.0,
            min_start_s=40.0,
        )
    return Plan(
        models=(dense, moe),
        runs=tuple(
            (model.name, optimizer.name) for optimizer in OPTIMIZERS for model in (dense, moe)
        ),
        steps=20,
        device_flags=("--distributed-backend", "nccl"),
        lr=(2e-3, 2e-4),
        budget_s=190.0,  # six runs of 25-33 s each on an H200 (start-up is most of it)
        run_limit_s=60.0,
        min_start_s=12.0,
    )


def moonlight_flags() -> list[str]:
    """Moonlight's Muon settings in Megatron's flags, from the file both launchers source,
    so that this check runs the method the launchers run."""
    script = 'source launch/megatron/moonlight_flags.sh && printf "%s\\0" "${MOONLIGHT[@]}"'
    printed = subprocess.run(
        ["bash", "-c", script], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout
    return printed.split("\0")[:-1]


def data_flags() -> tuple[list[str], list[str]]:
    """The embedded stdlib byte corpus when this Python ships its sources, else Megatron's
    mock data (some images keep only bytecode), with a note saying so."""
    try:
        stdlib_corpus()
    except RuntimeError as missing:
        return ["--mock-data"], [f"Megatron's mock data instead of the stdlib corpus: {missing}"]
    return [], []


def command(plan: Plan, model: Model, optimizer: Optimizer, shared: list[str]) -> list[str]:
    """``torch.distributed.run`` of ``pretrain_gpt.py`` on one rank, logging every step;
    ``shared``: the flags every run takes last (Moonlight's settings, the data)."""
    steps = str(plan.steps)
    return [
        *(sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "1"),
        *("--master-port", str(free_port()), "-m", "launch.megatron.pretrain_gpt"),
        *model.flags,
        *plan.device_flags,
        *NO_FUSED_KERNELS,
        *("--micro-batch-size", "8", "--global-batch-size", "16", "--train-iters", steps),
        *("--bf16", "--hidden-dropout", "0", "--attention-dropout", "0", "--clip-grad", "1.0"),
        *("--seed", "1234", "--eval-iters", "0", "--eval-interval", steps, "--log-interval", "1"),
        *("--timing-log-level", "1", "--logging-level", "20", "--log-memory-interval", steps),
        *optimizer.flags,
        *("--lr", str(plan.lr[0]), "--min-lr", str(plan.lr[1]), "--lr-decay-style", "cosine"),
        *("--lr-warmup-iters", "2", "--weight-decay", "0.1"),
        *shared,
    ]


def child_environment(dry_run: bool) -> dict[str, str]:
    """Megatron's jit fuser is ``torch.compile``: disabled, or every run compiles anew.
    CPU ranks see no GPU and take one thread each (the CI machine's cores are shared)."""
    environment = {**os.environ, "TORCH_COMPILE_DISABLE": "1"}
    if dry_run:
        environment |= {"CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    return environment


def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (Linux ``/proc``): torchrun starts each rank in a
    session of its own, so killing torchrun's process group would leave the rank running."""
    found = []
    for children in Path(f"/proc/{pid}/task").glob("*/children"):
        try:
            direct = [int(child) for child in children.read_text().split()]
        except OSError:  # the task ended while we looked
            continue
        for child in direct:
            found += [child, *descendants(child)]
    return found


def kill_tree(pid: int) -> None:
    """SIGKILL ``pid`` and everything it started (torchrun restarts nothing by default)."""
    below = descendants(pid)
    for process in (pid, *below):
        with contextlib.suppress(ProcessLookupError):
            os.kill(process, signal.SIGKILL)


def run_logged(
    argv: list[str], environment: dict[str, str], log: Path, limit_s: float
) -> int | None:
    """Run ``argv`` from the repository root, stdout and stderr into ``log`` in the order
    written (the timers go to stderr, the iteration lines to stdout). None: killed at
    ``limit_s``. torchrun stays in this process group, so the driver's kill reaches it."""
    with log.open("w") as sink:
        child = subprocess.Popen(
            argv, cwd=ROOT, env=environment, stdout=sink, stderr=subprocess.STDOUT
        )
        try:
            return child.wait(timeout=limit_s)
        except subprocess.TimeoutExpired:
            kill_tree(child.pid)
            child.wait()
            return None


ITERATION = re.compile(r"iteration\s+(\d+)/\s*\d+ \|")
LOSS = re.compile(r" lm loss: (\S+) \|")
ITERATION_MS = re.compile(r" elapsed time per iteration \(ms\): (\S+) \|")
OPTIMIZER_TIMER = re.compile(r"^\s*optimizer \.+: \(([\d.]+), ([\d.]+)\)")
"""Megatron's ``optimizer`` timer line, "(min, max)" over ranks; not ``optimizer-*``."""
MEMORY = re.compile(
    r"\(after (\d+) iterations\) memory \(MB\) \| allocated: \S+ \| max allocated: (\S+) "
    r"\| reserved: \S+ \| max reserved: (\S+)"
)
MUON_DS_WORK = re.compile(r"muon_ds: rank 0: Newton-Schulz on (\d+) matrices, (\d+) Muon")


def per_iteration(log_text: str) -> dict[int, dict[str, float]]:
    """Loss, iteration time and optimizer time by iteration. The timers are printed after
    their iteration's line, so each belongs to the last iteration seen."""
    found: dict[int, dict[str, float]] = {}
    iteration = None
    for line in log_text.splitlines():
        if (match := ITERATION.search(line)) and (loss := LOSS.search(line)):
            iteration = int(match.group(1))
            found[iteration] = {"loss": float(loss.group(1))}
            if elapsed := ITERATION_MS.search(line):
                found[iteration]["iteration_ms"] = float(elapsed.group(1))
        elif iteration is not None and (timer := OPTIMIZER_TIMER.match(line)):
            found[iteration]["optimizer_ms"] = float(timer.group(2))
    return found


def steady_median(iterations: dict[int, dict[str, float]], key: str) -> float | None:
    """Median of ``key`` over the iterations after the second (start-up, autotuning)."""
    values = [row[key] for step, row in iterations.items() if step > 2 and key in row]
    return statistics.median(values) if values else None


def loss_columns(steps: int) -> dict[str, int]:
    """The table's loss columns: first, middle and last step."""
    return {f"loss@{step}": step for step in (1, steps // 2, steps)}


def failure_excerpt(log_text: str) -> str:
    """The first traceback (a rank's root cause; torchrun's own comes after), or the tail."""
    start = log_text.find("Traceback (most recent call last)")
    return log_text[start : start + 3000] if start >= 0 else log_text[-2000:]


def measure(
    log_text: str, steps: int, model: Model, optimizer: Optimizer
) -> tuple[dict[str, Any], list[str]]:
    """The run's figures, and the problems that fail a checked run."""
    iterations = per_iteration(log_text)
    losses = {step: row["loss"] for step, row in iterations.items()}
    row: dict[str, Any] = {
        column: losses.get(step) for column, step in loss_columns(steps).items()
    } | {
        "iteration ms": steady_median(iterations, "iteration_ms"),
        "optimizer ms": steady_median(iterations, "optimizer_ms"),
    }
    if row["iteration ms"] and row["optimizer ms"] is not None:
        row["optimizer share %"] = 100 * row["optimizer ms"] / row["iteration ms"]
    if memory := MEMORY.findall(log_text):
        _, max_allocated, max_reserved = max(memory, key=lambda found: int(found[0]))
        row |= {"peak allocated MB": float(max_allocated), "peak reserved MB": float(max_reserved)}
    problems = []
    if sorted(losses) != list(range(1, steps + 1)):
        problems.append(f"losses logged for steps {sorted(losses)}, not 1..{steps}")
    if not all(math.isfinite(loss) for loss in losses.values()):
        problems.append(f"non-finite loss: {losses}")
    elif 1 in losses and steps in losses and not losses[steps] < losses[1]:
        problems.append(f"loss did not decrease: {losses[1]} at step 1, {losses[steps]} last")
    if optimizer.name == "muon_ds":
        work = MUON_DS_WORK.search(log_text)
        expected = model.muon_matrices * steps
        row["NS matrices"] = int(work.group(1)) if work else None
        row["exchange bytes"] = int(work.group(2)) if work else None
        if row["NS matrices"] != expected:
            problems.append(f"Newton-Schulz on {row['NS matrices']} matrices, not {expected}")
    return row, problems


def run_one(
    plan: Plan, model: Model, optimizer: Optimizer, shared: list[str], out: Path, remaining_s: float
) -> tuple[dict[str, Any], list[str]]:
    """One run in its box: its table row, and its notes (failures, skips)."""
    row: dict[str, Any] = {"model": model.name, "optimizer": optimizer.name}
    label = f"{model.name} / {optimizer.name}"
    if remaining_s < plan.min_start_s:
        row["status"] = "skipped"
        return row, [f"{label}: skipped, {remaining_s:.0f} s of the part's budget left"]
    limit_s = min(plan.run_limit_s, remaining_s)
    log = out / PART / f"{model.name}-{optimizer.name}.log".replace(" ", "_")
    argv = command(plan, model, optimizer, shared)
    began = time.monotonic()
    status = run_logged(argv, child_environment("--cpu" in plan.device_flags), log, limit_s)
    row["wall s"] = time.monotonic() - began
    log_text = log.read_text(errors="replace")
    figures, problems = measure(log_text, plan.steps, model, optimizer)
    row |= figures
    if status is None:
        problems.insert(0, f"killed at its {limit_s:.0f} s time box")
    elif status != 0:
        problems.insert(0, f"exit status {status}")
    row["status"] = "ok" if not problems else "FAILED"
    notes = [f"{label}: {problem}" for problem in problems]
    if status != 0:
        notes.append(f"{label}: log ({log.name}):\n{failure_excerpt(log_text)}")
    return row, notes


def table(rows: list[dict[str, Any]], steps: int) -> str:
    """The report's table: models grouped, optimizers in OPTIMIZERS order."""
    order = [o.name for o in OPTIMIZERS]
    columns = ["model", "optimizer", "status", *loss_columns(steps), "iteration ms"]
    columns += ["optimizer ms", "optimizer share %", "peak allocated MB", "NS matrices", "wall s"]
    ordered = sorted(rows, key=lambda r: (r["model"], order.index(r["optimizer"])))
    return markdown_table(ordered, columns)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--dry-run", action="store_true", help="CPU ranks, a toy model")
    args = parser.parse_args()
    began = time.monotonic()
    chosen = plan(args.dry_run)
    (args.out / PART).mkdir(parents=True, exist_ok=True)
    by_name = {m.name: m for m in chosen.models}
    optimizers = {o.name: o for o in OPTIMIZERS}
    data, notes = data_flags()
    shared = [*moonlight_flags(), *data]
    rows, ok = [], True
    for model_name, optimizer_name in chosen.runs:
        model, optimizer = by_name[model_name], optimizers[optimizer_name]
        remaining_s = chosen.budget_s - (time.monotonic() - began)
        row, run_notes = run_one(chosen, model, optimizer, shared, args.out, remaining_s)
        print(f"{model.name} / {optimizer.name}: {row}", *run_notes, sep="\n", flush=True)
        rows.append(row)
        notes += run_notes
        ok &= row["status"] == "ok" or not optimizer.checked
    device = torch.device("cpu" if args.dry_run else "cuda")
    notes.append(
        f"{chosen.steps} steps, bf16, one rank; times are medians over steps 3..{chosen.steps}; "
        f"logs in {PART}/"
        + ("; CPU: no CUDA memory statistics (the peaks read 0)" if args.dry_run else "")
    )
    result = PartResult(PART, ok, device_name(device), table(rows, chosen.steps), rows, notes)
    write_result(args.out, result)
    raise SystemExit(0 if ok else 1)


if __name__ == "__main__":
    main()
