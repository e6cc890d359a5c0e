"""Communication overhead of Muon: muon_ds against each framework's AdamW and its own Muon.

One command trains every contender on the same model, ranks, seed and tokens, each run in
fresh processes (one per rank) with torch.distributed's collectives wrapped by
``muon_ds.testing.collectives`` before any framework starts, and reports per contender, model
and layout:

* bytes per step by collective (payload and ring-model wire bytes, per rank and summed
  over ranks) and the total wire bytes over the same framework's AdamW at the same layout
  (``BASELINES``: ``zero1_adamw`` for DeepSpeed ZeRO-1, ``zero3_adamw`` for ZeRO-3,
  ``fsdp2_adamw`` for FSDP2, ``megatron_adam`` for Megatron);
* Newton-Schulz calls summed over ranks over the model's Muon matrices (NS redundancy:
  1.00 means each matrix is orthogonalised once) and the max/mean NS FLOPs over ranks;
* optimizer-step and iteration time (the slowest rank's median over the measured steps)
  and their ratio to AdamW's, in this run; optimizer-state bytes and, where the contender
  reports it, their ratio to the ideal (4 bytes an element Muon steps, 8 AdamW's);
* each muon_ds run against its issue's goals (``BYTE_GOALS``).

Counted quantities are exact; times depend on the machine and its load, so read them only
as ratios within one run. A contender that fails on a layout is reported as failed with
its first error line (each rank's log is kept under ``<out>/logs``).

    .venv/bin/python -m benchmarks.comm_overhead [--models dense moe] [--worlds 2 4]
        [--contenders zero1_adamw ...] [--steps 5] [--warmup 2] [--out out/comm_overhead]

The contenders live in ``deepspeed_contenders.py``, ``megatron_contenders.py`` and
``fsdp2_contenders.py``; each exposes ``CONTENDERS`` and ``LAYOUTS`` (see their docstrings
for what each one runs).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib
import json
import math
import multiprocessing
import os
import platform
import queue as queue_module
import statistics
import sys
import time
import traceback
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch

from benchmarks.run_options import RunOptions
from benchmarks.shapes import CPU_SHAPES, ModelShape, full_size
from muon_ds.testing.ports import free_port

CONTENDER_MODULES = (
    "benchmarks.deepspeed_contenders",
    "benchmarks.megatron_contenders",
    "benchmarks.fsdp2_contenders",
)
BASELINES = {
    "deepspeed": "zero1_adamw",
    "deepspeed_zero3": "zero3_adamw",
    "megatron": "megatron_adam",
    "fsdp2": "fsdp2_adamw",
}
"""Each framework's AdamW, the denominator of its contenders' ratios (a ZeRO stage's
contenders are a framework of their own: ZeRO-3 moves parameters, ZeRO-1 does not)."""


@dataclasses.dataclass(frozen=True)
class ByteGoal:
    """What a framework's muon_ds contender may move per step, from the issue naming it."""

    issue: int
    adamw: float
    """At most this many times its framework's AdamW's wire bytes."""
    rivals: dict[str, float] = dataclasses.field(default_factory=dict)
    """At most this many times each named contender's wire bytes."""


BYTE_GOALS = {
    "deepspeed": ByteGoal(7, 1.05),
    "megatron": ByteGoal(7, 1.05),
    "deepspeed_zero3": ByteGoal(18, 1.25, {"deepspeed_muon_zero3": 0.5}),
    "fsdp2": ByteGoal(18, 1.25),
}
FAILURE_GRACE_SECONDS = 30.0
"""After one rank fails, how long the others get to report before they are killed (a rank
waiting in a collective for the failed one would otherwise hang until the timeout)."""


@dataclasses.dataclass(frozen=True)
class Run:
    module: str
    contender: str
    shape: ModelShape
    world: int
    layout: str


def load_contenders(
    modules: Iterable[str] = CONTENDER_MODULES,
) -> tuple[dict[str, tuple[str, Any]], list[str]]:
    """Contender name -> (module name, its LAYOUTS), and why any module could not load."""
    found: dict[str, tuple[str, Any]] = {}
    problems = []
    for name in modules:
        try:
            module = importlib.import_module(name)
        except Exception as error:  # one framework's breakage must not hide the other's
            problems.append(f"{name} did not import: {type(error).__name__}: {error}")
            continue
        for contender in module.CONTENDERS:
            found[contender] = (name, module.LAYOUTS)
    return found, problems


def layouts_of(layouts: Any, model: str, world: int) -> list[str]:
    """A contender module's layouts for (model, world): LAYOUTS is a dict or a callable."""
    if callable(layouts):
        return list(layouts(model, world))
    return list(layouts.get((model, world), []))


def plan_runs(
    contenders: dict[str, tuple[str, Any]],
    selected: list[str],
    shapes: list[ModelShape],
    worlds: list[int],
) -> tuple[list[Run], list[str]]:
    """The runs to make, and each (contender, model, world) it has no layout for."""
    runs, unsupported = [], []
    for shape in shapes:
        for world in worlds:
            for contender in selected:
                module, layouts = contenders[contender]
                supported = layouts_of(layouts, shape.name, world)
                if not supported:
                    unsupported.append(
                        f"{contender} has no layout for {shape.name} at {world} ranks"
                    )
                for layout in supported:
                    runs.append(Run(module, contender, shape, world, layout))
    return runs, unsupported


# --- one run: a process per rank -------------------------------------------------------------


def _rank_main(
    run: Run,
    rank: int,
    options: RunOptions,
    port: int,
    threads: int,
    log_path: str,
    results: Any,
) -> None:
    """One rank: the environment the interface promises, then the contender's ``run``."""
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(run.world),
        LOCAL_RANK=str(rank),
        LOCAL_WORLD_SIZE=str(run.world),
    )
    with open(log_path, "w") as log:
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
    try:
        torch.set_num_threads(threads)
        from muon_ds.testing import collectives

        collectives.install()
        module = importlib.import_module(run.module)
        record = module.CONTENDERS[run.contender](rank, run.world, run.shape, options)
        results.put((rank, "ok", record))
    except BaseException as error:  # reported to the driver, which marks the run failed
        traceback.print_exc()
        message = f"{type(error).__name__}: {error}".strip().splitlines()[0]
        results.put((rank, "error", message))
    finally:
        import torch.distributed as dist

        if dist.is_initialized():
            with contextlib.suppress(Exception):
                dist.destroy_process_group()


def run_one(
    run: Run,
    options: RunOptions,
    logs: Path,
    timeout: float,
    grace: float = FAILURE_GRACE_SECONDS,
) -> dict[str, Any]:
    """Spawn the ranks, collect one record each; any failure makes the whole run failed."""
    context = multiprocessing.get_context("spawn")
    results = context.Queue()
    port = free_port()
    threads = max(1, (os.cpu_count() or 1) // run.world)
    options = dataclasses.replace(options, layout=run.layout)
    stem = f"{run.contender}_{run.shape.name}_{run.layout.replace('=', '').replace('x', '_')}"
    procs = [
        context.Process(
            target=_rank_main,
            args=(run, rank, options, port, threads, str(logs / f"{stem}_rank{rank}.log"), results),
        )
        for rank in range(run.world)
    ]
    for proc in procs:
        proc.start()
    outcomes: dict[int, tuple[str, Any]] = {}
    deadline = time.monotonic() + timeout
    try:
        while len(outcomes) < run.world and time.monotonic() < deadline:
            try:
                rank, status, payload = results.get(timeout=1.0)
            except queue_module.Empty:
                for rank, proc in enumerate(procs):
                    # A clean exit's record may still be in the pipe; a crash sends none.
                    if rank not in outcomes and proc.exitcode not in (None, 0):
                        outcomes[rank] = ("error", f"exited with code {proc.exitcode}")
                        deadline = min(deadline, time.monotonic() + grace)
                continue
            outcomes[rank] = (status, payload)
            if status == "error":
                deadline = min(deadline, time.monotonic() + grace)
    finally:
        for proc in procs:
            proc.join(timeout=5)
            if proc.is_alive():
                proc.kill()
                proc.join()
    base = {
        "contender": run.contender,
        "model": run.shape.name,
        "world": run.world,
        "layout": run.layout,
    }
    # Dicts keep arrival order: the first error is the cause, later ones mostly its echo
    # (peers losing their connection to the failed rank).
    errors = [(r, p) for r, (status, p) in outcomes.items() if status == "error"]
    if errors or len(outcomes) < run.world:
        if errors:
            rank, message = errors[0]
            error = f"rank {rank}: {message}"
        else:
            error = f"timed out after {timeout:.0f} s ({len(outcomes)}/{run.world} ranks reported)"
        return {**base, "status": "failed", "error": error}
    return {**base, "status": "ok", "ranks": [outcomes[r][1] for r in range(run.world)]}


# --- aggregation -----------------------------------------------------------------------------


def summarise(record: dict[str, Any]) -> dict[str, Any]:
    """Totals over ranks of one successful run (everything the table and the goals use)."""
    ranks = record["ranks"]
    first = ranks[0]
    ops = sorted({op for r in ranks for op in r["collectives_per_step"]})
    by_op = {
        op: {
            key: [r["collectives_per_step"].get(op, {}).get(key, 0) for r in ranks]
            for key in ("calls", "payload", "wire")
        }
        for op in ops
    }
    ns_calls = [r["ns_calls_per_step"] for r in ranks]
    ns_flops = [r["ns_flops_per_step"] for r in ranks]
    mean_flops = statistics.mean(ns_flops)
    return {
        "framework": first["framework"],
        "device": first["device"],
        "by_op": by_op,
        "wire_total": sum(sum(v["wire"]) for v in by_op.values()),
        "payload_total": sum(sum(v["payload"]) for v in by_op.values()),
        "calls_total": sum(sum(v["calls"]) for v in by_op.values()),
        "counts_constant": all(r["counts_constant"] for r in ranks),
        "ns_calls_total": sum(ns_calls),
        "logical_matrices": first["logical_matrices"],
        "ns_redundancy": sum(ns_calls) / first["logical_matrices"] if sum(ns_calls) else None,
        "ns_flop_imbalance": max(ns_flops) / mean_flops if mean_flops else None,
        "optimizer_step_seconds": max(r["optimizer_step_seconds"] for r in ranks),
        "iteration_seconds": max(r["iteration_seconds"] for r in ranks),
        "state_bytes_total": sum(r["state_bytes"] for r in ranks),
        "state_bytes_max": max(r["state_bytes"] for r in ranks),
        "ideal_state_bytes_total": _total_or_none([r.get("ideal_state_bytes") for r in ranks]),
        "param_count": first["param_count"],
        "final_loss": first["final_loss"],
        "notes": first["notes"],
    }


def _total_or_none(values: list[int | None]) -> int | None:
    """The sum, or None when a rank did not report the quantity (Megatron's contenders do
    not compute an ideal state)."""
    return None if any(v is None for v in values) else sum(values)  # type: ignore[arg-type]


def aggregate(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Add each run's totals and its ratios to its framework's AdamW at the same layout."""
    for record in records:
        if record["status"] == "ok":
            record["summary"] = summarise(record)
    baselines = {
        (r["summary"]["framework"], r["model"], r["layout"]): r["summary"]
        for r in records
        if r["status"] == "ok" and r["contender"] in BASELINES.values()
    }
    for record in records:
        if record["status"] != "ok":
            continue
        summary = record["summary"]
        baseline = baselines.get((summary["framework"], record["model"], record["layout"]))
        summary["wire_ratio"] = summary["wire_total"] / baseline["wire_total"] if baseline else None
        summary["step_time_ratio"] = (
            summary["optimizer_step_seconds"] / baseline["optimizer_step_seconds"]
            if baseline
            else None
        )
    return records


# --- output ----------------------------------------------------------------------------------


def _fmt(value: float | None, spec: str) -> str:
    return "—" if value is None else format(value, spec)


def _mb(nbytes: float) -> str:
    return f"{nbytes / 1e6:.3f}"


def markdown_table(records: list[dict[str, Any]]) -> str:
    header = (
        "| model | layout | contender | wire MB/step | x AdamW | calls/step | NS calls/step "
        "(matrices) | NS redundancy | NS FLOP max/mean | opt step ms | x AdamW | iteration ms "
        "| state MB | x ideal | final loss |"
    )
    lines = [header, header_rule(header)]
    for r in _table_order(records):
        head = f"| {r['model']} | {r['layout']} | {r['contender']} |"
        if r["status"] != "ok":
            lines.append(f"{head} FAILED: {r['error'].replace('|', '/')} |" + " |" * 11)
            continue
        s = r["summary"]
        lines.append(
            f"{head} {_mb(s['wire_total'])} | {_fmt(s['wire_ratio'], '.3f')} | "
            f"{s['calls_total']:g} | {s['ns_calls_total']:g} ({s['logical_matrices']}) | "
            f"{_fmt(s['ns_redundancy'], '.2f')} | {_fmt(s['ns_flop_imbalance'], '.2f')} | "
            f"{1e3 * s['optimizer_step_seconds']:.1f} | {_fmt(s['step_time_ratio'], '.2f')} | "
            f"{1e3 * s['iteration_seconds']:.1f} | {_mb(s['state_bytes_total'])} | "
            f"{_fmt(_state_over_ideal(s), '.4f')} | {s['final_loss']:.4f} |"
        )
    return "\n".join(lines)


def _state_over_ideal(summary: dict[str, Any]) -> float | None:
    ideal = summary.get("ideal_state_bytes_total")
    return summary["state_bytes_total"] / ideal if ideal else None


def _table_order(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Grouped by model, ranks and layout, contenders in run order within a group."""
    return sorted(records, key=lambda r: (r["model"], r["world"], r["layout"]))


def header_rule(header: str) -> str:
    return "|" + "---|" * (header.count("|") - 1)


def per_rank_table(records: list[dict[str, Any]]) -> str:
    header = "| model | layout | contender | op | calls/step per rank | wire KB/step per rank |"
    lines = [header, header_rule(header)]
    for r in _table_order(records):
        if r["status"] != "ok":
            continue
        for op, values in r["summary"]["by_op"].items():
            calls = " / ".join(f"{c:g}" for c in values["calls"])
            wire = " / ".join(f"{w / 1e3:.1f}" for w in values["wire"])
            lines.append(
                f"| {r['model']} | {r['layout']} | {r['contender']} | {op} | {calls} | {wire} |"
            )
    return "\n".join(lines)


def goals(records: list[dict[str, Any]]) -> str:
    """Each muon_ds run against its issue's goals (``BYTE_GOALS``): wire bytes over its
    framework's AdamW and named rivals, NS redundancy, optimizer state against its ideal;
    and its optimizer time against every other Muon of its framework (issue 7)."""
    ok = [r for r in records if "summary" in r]
    lines = []
    for mine in ok:
        if mine["contender"].startswith("muon_ds"):
            lines += _goal_lines(mine, ok)
    return "\n".join(lines)


def _met(met: bool) -> str:
    return "met" if met else "NOT met"


def _goal_lines(mine: dict[str, Any], ok: list[dict[str, Any]]) -> list[str]:
    s = mine["summary"]
    goal = BYTE_GOALS[s["framework"]]
    ratio, redundancy = s["wire_ratio"], s["ns_redundancy"]
    line = (
        f"- {mine['model']} {mine['layout']} {mine['contender']} (issue {goal.issue}): bytes "
        f"{_fmt(ratio, '.4f')}x AdamW (<= {goal.adamw}: "
        f"{_met(ratio is not None and ratio <= goal.adamw)}); NS redundancy "
        f"{_fmt(redundancy, '.2f')} (= 1.00: {_met(redundancy == 1.0)})"
    )
    ideal = s.get("ideal_state_bytes_total")
    if ideal is not None:
        line += (
            f"; state {_mb(s['state_bytes_total'])} MB, ideal {_mb(ideal)} MB "
            f"(= ideal: {_met(s['state_bytes_total'] == ideal)})"
        )
    rivals = [
        r
        for r in ok
        if (r["model"], r["layout"]) == (mine["model"], mine["layout"])
        and r["summary"]["framework"] == s["framework"]
        and r["contender"] not in (mine["contender"], BASELINES[s["framework"]])
    ]
    return [line] + [_rival_line(s, r, goal.rivals.get(r["contender"])) for r in rivals]


def _rival_line(mine: dict[str, Any], rival: dict[str, Any], limit: float | None) -> str:
    """Bytes (against the issue's limit, where it names this rival) and optimizer time."""
    other = rival["summary"]
    bytes_ratio = mine["wire_total"] / other["wire_total"]
    step_ratio = mine["optimizer_step_seconds"] / other["optimizer_step_seconds"]
    bound = "" if limit is None else f" (<= {limit}: {_met(bytes_ratio <= limit)})"
    return (
        f"  - vs {rival['contender']} (NS redundancy {_fmt(other['ns_redundancy'], '.2f')}, "
        f"bytes {_fmt(other['wire_ratio'], '.4f')}x AdamW): bytes {bytes_ratio:.4f}x its{bound}; "
        f"optimizer step {step_ratio:.2f}x its time ({_met(step_ratio < 1)})"
    )


def plots(records: list[dict[str, Any]], out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in records if "summary" in r]
    written = []
    panels: list[tuple[str, str, Callable[[dict[str, Any]], float | None]]] = [
        ("wire_ratio", "total wire bytes / AdamW's", lambda s: s["wire_ratio"]),
        ("ns_redundancy", "NS calls over ranks / Muon matrices", lambda s: s["ns_redundancy"]),
        ("step_time_ratio", "optimizer step time / AdamW's", lambda s: s["step_time_ratio"]),
    ]
    groups = sorted({(r["model"], r["layout"]) for r in ok})
    contenders = sorted({r["contender"] for r in ok})
    for key, label, value in panels:
        fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(groups)), 4))
        width = 0.8 / max(1, len(contenders))
        for i, contender in enumerate(contenders):
            heights = []
            for group in groups:
                match = [r for r in ok if (r["model"], r["layout"]) == group]
                match = [r for r in match if r["contender"] == contender]
                heights.append((value(match[0]["summary"]) or 0.0) if match else math.nan)
            ax.bar([g + i * width for g in range(len(groups))], heights, width, label=contender)
        ax.set_xticks([g + 0.4 - width / 2 for g in range(len(groups))])
        ax.set_xticklabels([f"{m}\n{lay}" for m, lay in groups])
        ax.set_ylabel(label)
        ax.axhline(1.0, color="grey", linewidth=0.8)
        ax.legend(fontsize=7)
        fig.tight_layout()
        path = out / f"{key}.png"
        fig.savefig(path, dpi=120)
        plt.close(fig)
        written.append(path)
    return written


def device_line(records: list[dict[str, Any]]) -> str:
    devices = sorted({r["summary"]["device"] for r in records if "summary" in r})
    cpu = platform.processor() or platform.machine()
    return (
        f"Device: {', '.join(devices) or 'none ran'} ({os.cpu_count()} CPU cores, {cpu}); "
        f"torch {torch.__version__}; {'CUDA' if torch.cuda.is_available() else 'no CUDA GPU'}."
    )


# --- CLI -------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None, known: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--contenders", nargs="+", default=known, help=f"from {known}")
    parser.add_argument("--models", nargs="+", default=sorted(CPU_SHAPES), choices=CPU_SHAPES)
    parser.add_argument("--worlds", nargs="+", type=int, default=[2, 4])
    parser.add_argument("--steps", type=int, default=RunOptions.steps, help="measured steps")
    parser.add_argument("--warmup", type=int, default=RunOptions.warmup)
    parser.add_argument("--dtype", default=RunOptions.dtype, choices=("fp32", "bf16"))
    parser.add_argument(
        "--full-size", action="store_true", help="full-size shapes (GPUs only; never run here)"
    )
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds per run")
    parser.add_argument("--out", type=Path, default=Path("out/comm_overhead"))
    args = parser.parse_args(argv)
    unknown = sorted(set(args.contenders) - set(known))
    if unknown:
        parser.error(f"unknown contender(s) {unknown}; available: {known}")
    if args.full_size and not torch.cuda.is_available():
        parser.error("--full-size needs CUDA GPUs: the full-size models do not fit a CPU run")
    if any(world < 1 for world in args.worlds):
        parser.error(f"--worlds {args.worlds}: every world size must be >= 1")
    return args


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    if not torch.cuda.is_available():
        # Inherited by every rank: DeepSpeed picks its accelerator when first imported.
        os.environ.update(DS_ACCELERATOR="cpu", CUDA_VISIBLE_DEVICES="")
    from tqdm import tqdm

    contenders, problems = load_contenders()
    for problem in problems:
        print(f"warning: {problem}", file=sys.stderr)
    args = parse_args(argv, list(contenders))
    options = RunOptions(steps=args.steps, warmup=args.warmup, dtype=args.dtype)
    shapes = [CPU_SHAPES[m] for m in args.models]
    if args.full_size:
        shapes = [full_size(s) for s in shapes]
    runs, unsupported = plan_runs(contenders, args.contenders, shapes, args.worlds)
    logs = args.out / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    records = []
    bar = tqdm(runs, desc="comm_overhead", unit="run", file=sys.stderr)
    for run in bar:
        bar.set_postfix_str(f"{run.contender} {run.shape.name} {run.layout}")
        records.append(run_one(run, options, logs, args.timeout))
    aggregate(records)
    report = "\n\n".join(
        [
            f"# Communication overhead ({options.steps} measured steps after "
            f"{options.warmup} warm-up, {options.dtype})",
            device_line(records),
            *[f"Not run: {reason}." for reason in problems + unsupported],
            markdown_table(records),
            "Per rank, by collective (ranks in order):",
            per_rank_table(records),
            "Goals (issues 7 and 18):",
            goals(records) or "(no muon_ds contender ran)",
            "Notes:",
            "\n".join(
                f"- {contender}: {note}"
                for contender, note in sorted(
                    {(r["contender"], r["summary"]["notes"]) for r in records if "summary" in r}
                )
            ),
        ]
    )
    print(report)
    (args.out / "results.json").write_text(
        json.dumps({"options": dataclasses.asdict(options), "runs": records}, indent=1)
    )
    (args.out / "report.md").write_text(report + "\n")
    for path in plots(records, args.out):
        print(f"wrote {path}", file=sys.stderr)
    return records


if __name__ == "__main__":
    main()
