"""GPU check, DeepSpeed part: ZeRO-1 training with MuonDS, DeepSpeed's AdamW and DeepSpeed's Muon.

    python -m benchmarks.gpu_check.deepspeed_train --out DIR [--dry-run]

Each contender trains the same 134M-parameter Llama-like GPT (``benchmarks.torch_models``,
12 layers x 768, vocab 32000, 8 x 512 tokens a step, bf16) from the same seed on the same
tokens for 30 steps, under DeepSpeed ZeRO stage 1 at world 1 (NCCL), with one lr and weight
decay for every part and clipping off:

* ``muon_ds``: ``"type": "MuonDS"`` (Moonlight's Muon; the Triton kernel on CUDA);
* ``deepspeed_adamw``: ``"type": "AdamW"`` with ``torch_adam`` (no op is JIT-built);
* ``deepspeed_muon``: DeepSpeed's own ``"type": "Muon"`` as ``benchmarks.deepspeed_contenders``
  configures it (quintic NS in bf16 under ``torch.compile``, scale sqrt(max(1, rows/cols)),
  so its loss is not comparable to the others').

Reported per contender: the loss at steps 1, 10, 20 and 30; the median optimizer time, which
is ``engine.step()`` plus ZeRO's ``get_flat_partition`` in backward (where DeepSpeed's Muon
runs its momentum and Newton-Schulz; for the others it only flattens gradients), and its
share of the median iteration; the median iteration (forward, backward, step), every time
taken with the device synchronised; peak allocated GPU memory; optimizer-state bytes.
Medians leave out the first two steps (kernel autotuning, ``torch.compile``).

Each contender runs in its own child process under its own time box: a crash, a CUDA fault
or a slow compile costs that contender alone, peak memory is the contender's own, and the
result so far is written after every contender, so a driver that kills this part still
finds what was measured. MuonDS runs first (it is what the check is for), DeepSpeed's Muon
last (its compile time is the least predictable). The part fails when a contender fails,
when any loss is not finite, or when MuonDS's last loss is not below its first.

Tokens are drawn from a Zipf unigram distribution: uniform tokens would leave nothing to
learn (the loss starts near ln V), while a skewed unigram is learned within a few steps,
so "the loss went down" is a real check after 30 steps.

``--dry-run`` runs the same code on the CPU (``DS_ACCELERATOR=cpu``, gloo) with a 2-layer,
64-wide model for 3 steps, ``torch.compile`` turned off (compiling DeepSpeed's Muon on a
CPU costs minutes and checks nothing here).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from benchmarks import torch_models
from benchmarks.deepspeed_contenders import state_bytes, synchronized_now, time_calls
from benchmarks.gpu_check import (
    PartResult,
    device_name,
    markdown_table,
    write_result,
)
from benchmarks.shapes import ModelShape
from muon_ds.testing.ports import free_port

PART = "deepspeed_train"
LR = 1e-3
WEIGHT_DECAY = 0.1
ADAMW = {"betas": [0.9, 0.95], "eps": 1e-8}
SEED = 0
ZIPF_EXPONENT = 1.1
WARMUP_STEPS = 2
"""Steps left out of the time medians: the first runs autotune kernels and compile."""
REPORTED_STEPS = (1, 10, 20, 30)
CONTENDERS = ("muon_ds", "deepspeed_adamw", "deepspeed_muon")
"""In run order: the product first, the least predictable compile last."""


@dataclass(frozen=True)
class Setup:
    """What a run trains and how long each contender may take."""

    shape: ModelShape
    steps: int
    time_boxes: dict[str, float]
    """Seconds for each contender but the last, which gets whatever the part has left."""
    part_budget: float
    """Seconds for every contender together, from when the first starts; the driver's box
    (100 s on the GPU) also holds this process's imports and the final write."""


GPU_SETUP = Setup(
    shape=ModelShape(
        name="gpt-134m",
        layers=12,
        hidden=768,
        heads=12,
        query_groups=12,
        ffn=2048,
        vocab=32000,
        seq=512,
        micro_batch=8,
    ),
    steps=30,
    time_boxes={"muon_ds": 40.0, "deepspeed_adamw": 20.0},
    part_budget=92.0,
)
DRY_RUN_SETUP = Setup(
    shape=ModelShape(
        name="toy",
        layers=2,
        hidden=64,
        heads=4,
        query_groups=4,
        ffn=176,
        vocab=512,
        seq=32,
        micro_batch=2,
    ),
    steps=3,
    time_boxes={"muon_ds": 30.0, "deepspeed_adamw": 30.0},
    part_budget=100.0,
)
GRACE_S = 10.0
"""A child stops itself at its time box and writes what it has; it is killed this much later."""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--dry-run", action="store_true", help="CPU, toy model, 3 steps")
    parser.add_argument("--contender", choices=CONTENDERS, help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--deadline", type=float, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


# --- one contender, in its own process ---------------------------------------------------


def optimizer_config(contender: str) -> dict[str, Any]:
    """The JSON optimizer block, one lr and weight decay for all, as the benchmarks set them."""
    shared = {"lr": LR, "weight_decay": WEIGHT_DECAY}
    if contender == "muon_ds":
        return {
            "type": "MuonDS",
            "params": {**shared, "adamw_betas": ADAMW["betas"], "adamw_eps": ADAMW["eps"]},
        }
    if contender == "deepspeed_adamw":
        return {"type": "AdamW", "params": {**shared, **ADAMW, "torch_adam": True}}
    muon = {"momentum": 0.95, "ns_method": "standard", "torch_adam": True}
    return {"type": "Muon", "params": {**shared, **ADAMW, **muon}}


def ds_config(shape: ModelShape, contender: str) -> dict[str, Any]:
    """ZeRO stage 1 in bf16, clipping off, DeepSpeed's own printing silenced."""
    return {
        "train_micro_batch_size_per_gpu": shape.micro_batch,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": 0.0,
        "optimizer": optimizer_config(contender),
        "zero_optimization": {"stage": 1},
        "bf16": {"enabled": True},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


def init_world_of_one(device: torch.device) -> None:
    """Join a one-rank world the way a launcher would have set it up, then start DeepSpeed.

    The environment is what ``deepspeed``/``torchrun`` would export, plus DeepSpeed's CPU
    accelerator off the GPU (it would pick CUDA wherever a GPU is visible). On the CPU
    accelerator DeepSpeed would JIT-build a shared-memory all-reduce op (minutes) that one
    rank never uses; on CUDA it builds nothing there, so skipping it changes nothing on a GPU.
    """
    os.environ.update(
        RANK="0",
        WORLD_SIZE="1",
        LOCAL_RANK="0",
        LOCAL_WORLD_SIZE="1",
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(free_port()),
    )
    if device.type == "cpu":
        os.environ["DS_ACCELERATOR"] = "cpu"
    import deepspeed

    from muon_ds.patches.deepspeed import skip_shm_op_build

    skip_shm_op_build()
    deepspeed.init_distributed(dist_backend="nccl" if device.type == "cuda" else "gloo")


def synthetic_batches(shape: ModelShape, steps: int, device: torch.device) -> list[torch.Tensor]:
    """``[micro_batch, seq + 1]`` Zipf-distributed token ids per step, made before timing."""
    ranks = torch.arange(1, shape.vocab + 1, dtype=torch.float64)
    probabilities = ranks.pow(-ZIPF_EXPONENT)
    count = shape.micro_batch * (shape.seq + 1)
    batches = []
    for step in range(steps):
        generator = torch.Generator().manual_seed(SEED * 1_000_003 + step)
        ids = torch.multinomial(probabilities, count, replacement=True, generator=generator)
        batches.append(ids.view(shape.micro_batch, shape.seq + 1).to(device))
    return batches


def staging_bytes(zero_optimizer: Any) -> int:
    """DeepSpeed's Muon stages each step's momentum in a second flat copy before committing
    it; that copy lives on the ZeRO optimizer, not in the optimizer state."""
    pending = getattr(zero_optimizer, "_muon_pending_momentum", {})
    return sum(staged.numel() * staged.element_size() for staged, _ in pending.values())


def train(contender: str, setup: Setup, device: torch.device, deadline: float) -> dict[str, Any]:
    """Train one contender for ``setup.steps`` steps, fewer if ``time.time()`` passes
    ``deadline`` (checked between steps: a step that compiles cannot be cut short)."""
    on_gpu = device.type == "cuda"
    init_world_of_one(device)
    import deepspeed

    if contender == "muon_ds":
        import muon_ds.deepspeed  # noqa: F401  (registers "type": "MuonDS")

    model = torch_models.build(setup.shape, SEED)
    engine, *_ = deepspeed.initialize(
        model=model, model_parameters=model.parameters(), config=ds_config(setup.shape, contender)
    )
    flatten_seconds = [0.0]
    time_calls(engine.optimizer, "get_flat_partition", flatten_seconds)
    batches = synthetic_batches(setup.shape, setup.steps, device)
    if on_gpu:
        torch.cuda.reset_peak_memory_stats(device)

    losses, step_s, flatten_s, iteration_s = [], [], [], []
    for batch in batches:
        if time.time() > deadline:
            break
        flatten_seconds[0] = 0.0
        start = synchronized_now()
        loss = engine(batch)
        engine.backward(loss)
        backward_done = synchronized_now()
        engine.step()
        end = synchronized_now()
        losses.append(loss.item())
        step_s.append(end - backward_done)
        flatten_s.append(flatten_seconds[0])
        iteration_s.append(end - start)

    measured = slice(min(WARMUP_STEPS, max(len(losses) - 1, 0)), None)
    optimizer_s = [s + f for s, f in zip(step_s, flatten_s, strict=True)]
    return {
        "contender": contender,
        "steps_done": len(losses),
        "losses": losses,
        "params": sum(p.numel() for p in engine.module.parameters()),
        "engine_step_ms": _median_ms(step_s[measured]),
        "backward_flatten_ms": _median_ms(flatten_s[measured]),
        "optimizer_ms": _median_ms(optimizer_s[measured]),
        "iteration_ms": _median_ms(iteration_s[measured]),
        "peak_memory_mib": torch.cuda.max_memory_allocated(device) / 2**20 if on_gpu else None,
        "state_mib": state_bytes(engine.basic_optimizer) / 2**20,
        "momentum_staging_mib": staging_bytes(engine.optimizer) / 2**20,
    }


def _median_ms(seconds: list[float]) -> float:
    """Median in milliseconds; NaN when a time box left no measured step."""
    return statistics.median(seconds) * 1e3 if seconds else math.nan


def run_child(args: argparse.Namespace) -> int:
    """The child's whole life: train, write the record, leave the process group cleanly."""
    if args.dry_run:
        torch.compiler.set_stance("force_eager")
    setup = DRY_RUN_SETUP if args.dry_run else GPU_SETUP
    record = train(args.contender, setup, part_device(args.dry_run), args.deadline)
    args.result.write_text(json.dumps(record) + "\n")
    dist.destroy_process_group()
    return 0


def part_device(dry_run: bool) -> torch.device:
    """The one GPU, or the CPU for a dry run (even where a GPU is visible)."""
    return torch.device("cpu") if dry_run else torch.device("cuda", 0)


# --- the part: one child per contender ----------------------------------------------------


def launch(contender: str, args: argparse.Namespace, time_box: float, log: Path) -> dict:
    """Run one contender in a child process: its record, or why there is none."""
    began = time.monotonic()
    with tempfile.TemporaryDirectory() as scratch:
        result = Path(scratch) / "result.json"
        command = [
            *(sys.executable, "-m", "benchmarks.gpu_check.deepspeed_train"),
            *("--out", str(args.out), "--contender", contender),
            *("--result", str(result), "--deadline", str(time.time() + time_box)),
            *(["--dry-run"] if args.dry_run else []),
        ]
        error = run_boxed(command, log, time_box + GRACE_S)
        if error is None and not result.exists():
            error = "exit 0 without a result"
        if error is None:
            record = json.loads(result.read_text())
        else:
            record = {"contender": contender, "error": f"{error} (log: {log})"}
    return {**record, "wall_s": time.monotonic() - began}


def run_boxed(command: list[str], log: Path, seconds: float) -> str | None:
    """Run ``command`` with its output in ``log``; why it failed, or None if it did not.

    The child runs in its own session so that a time-out kills everything it started
    (``torch.compile`` workers included), not just the child itself.
    """
    with log.open("w") as output:
        child = subprocess.Popen(
            command, stdout=output, stderr=subprocess.STDOUT, start_new_session=True
        )
        try:
            status = child.wait(timeout=seconds)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):  # it may end on its own meanwhile
                os.killpg(child.pid, signal.SIGKILL)
            child.wait()
            return f"killed after {seconds:.0f} s"
    return None if status == 0 else f"exit {status}: {_last_line(log)}"


def _last_line(log: Path) -> str:
    """The child's last non-empty output line: usually the exception that ended it."""
    lines = [line for line in log.read_text(errors="replace").splitlines() if line.strip()]
    return lines[-1].strip() if lines else "no output"


def loss_at(record: dict[str, Any], step: int) -> float | None:
    """The loss of the ``step``-th step (1-based), if the contender got that far."""
    losses = record.get("losses", [])
    return losses[step - 1] if step <= len(losses) else None


def table_row(record: dict[str, Any], steps: list[int]) -> dict[str, Any]:
    """One report row: losses at the reported steps, times, share, memory, state."""
    row: dict[str, Any] = {"contender": record["contender"]}
    for step in steps:
        loss = loss_at(record, step)
        row[f"loss@{step}"] = "-" if loss is None else loss
    if "error" in record:
        return {**row, "optimizer ms": "failed"}
    optimizer, iteration = record["optimizer_ms"], record["iteration_ms"]
    return {
        **row,
        "engine.step ms": record["engine_step_ms"],
        "flatten ms": record["backward_flatten_ms"],
        "optimizer ms": optimizer,
        "share": optimizer / iteration,
        "iteration ms": iteration,
        "peak MiB": record["peak_memory_mib"] if record["peak_memory_mib"] is not None else "n/a",
        "state MiB": record["state_mib"] + record["momentum_staging_mib"],
    }


def judge(records: list[dict[str, Any]], setup: Setup) -> list[str]:
    """What failed: contenders that did not finish, non-finite losses, MuonDS not learning."""
    failures = []
    for record in records:
        name = record["contender"]
        if "error" in record:
            failures.append(f"{name} failed: {record['error']}")
            continue
        if record["steps_done"] < setup.steps:
            failures.append(f"{name} ran {record['steps_done']}/{setup.steps} steps (time box)")
        if not all(math.isfinite(loss) for loss in record["losses"]):
            failures.append(f"{name} has a non-finite loss: {record['losses']}")
        if name == "muon_ds" and record["losses"]:
            first, last = record["losses"][0], record["losses"][-1]
            if not last < first:
                failures.append(f"muon_ds's loss did not go down: step 1 {first}, last {last}")
    return failures


def report(
    records: list[dict[str, Any]], setup: Setup, device: str, pending: list[str]
) -> PartResult:
    """The part's result for the records so far; ``pending`` contenders have not run yet."""
    steps = [s for s in sorted({*REPORTED_STEPS, setup.steps}) if s <= setup.steps]
    rows = [table_row(r, steps) for r in records]
    columns = ["contender", *(f"loss@{s}" for s in steps), "engine.step ms", "flatten ms"]
    columns += ["optimizer ms", "share", "iteration ms", "peak MiB", "state MiB"]
    failures = judge(records, setup)
    notes = [*failures, *(f"{name} has not run (yet)" for name in pending)]
    notes += [
        f"{setup.shape.name}: {setup.shape.layers} layers x {setup.shape.hidden}, vocab "
        f"{setup.shape.vocab}, {setup.shape.micro_batch} x {setup.shape.seq} Zipf tokens a step, "
        f"bf16, ZeRO-1, world 1, lr {LR}, weight decay {WEIGHT_DECAY}, {setup.steps} steps.",
        "optimizer ms = engine.step ms + flatten ms, the time in ZeRO's get_flat_partition during "
        "backward (where DeepSpeed's Muon runs momentum and NS; the others only flatten "
        "gradients there); share = optimizer / iteration; medians leave out the first "
        f"{WARMUP_STEPS} steps. state MiB includes DeepSpeed Muon's momentum staging copy.",
        "deepspeed_muon scales updates by sqrt(max(1, rows/cols)), not Moonlight's "
        "0.2 sqrt(max(rows, cols)): its losses are not comparable to the others'.",
    ]
    if setup is DRY_RUN_SETUP:
        notes.append("dry run: CPU, toy model, torch.compile off (DeepSpeed's Muon eager).")
    return PartResult(
        part=PART,
        ok=not failures and not pending,
        device=device,
        table=markdown_table(rows, columns),
        rows=records,
        notes=notes,
    )


def run_part(args: argparse.Namespace) -> int:
    """Every contender in turn under its time box, the result rewritten after each."""
    started = time.perf_counter()
    setup = DRY_RUN_SETUP if args.dry_run else GPU_SETUP
    if not args.dry_run and not torch.cuda.is_available():
        result = PartResult(PART, ok=False, device=device_name(torch.device("cpu")))
        result.notes.append("no CUDA device: run with --dry-run on a CPU")
        write_result(args.out, result)
        return 1
    device = device_name(part_device(args.dry_run))
    logs = args.out / f"{PART}_logs"
    logs.mkdir(parents=True, exist_ok=True)
    records: list[dict[str, Any]] = []
    for index, contender in enumerate(CONTENDERS):
        left = setup.part_budget - (time.perf_counter() - started) - GRACE_S
        last = index == len(CONTENDERS) - 1
        time_box = max(left, 0.0) if last else min(setup.time_boxes[contender], left)
        if time_box <= 0:
            records.append({"contender": contender, "error": "no time left in the part's budget"})
            continue
        records.append(launch(contender, args, time_box, logs / f"{contender}.log"))
        write_result(args.out, report(records, setup, device, list(CONTENDERS[index + 1 :])))
    result = report(records, setup, device, [])
    write_result(args.out, result)
    print(result.table)
    print("\n".join(result.notes))
    return 0 if result.ok else 1


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return run_child(args) if args.contender else run_part(args)


if __name__ == "__main__":
    sys.exit(main())
