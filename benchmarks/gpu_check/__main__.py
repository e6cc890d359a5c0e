"""Runs every part of the GPU check, each in its own time box; writes report.md, results.json.

    python -m benchmarks.gpu_check [--out out/gpu_check] [--dry-run] [--only PART ...]

Parts: the kernel tests compiled and the sharded step on CUDA tensors (together: tests
only), then kernel speed, DeepSpeed ZeRO-1 training and Megatron ``pretrain()`` training,
each alone since each measures time. A part that fails or overruns its box is reported
and the next one starts. The exit status is 0 only if every part ran and every check held.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import platform
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from benchmarks.gpu_check import PartResult, device_name, markdown_table


@dataclass(frozen=True)
class Part:
    """One child process of the check."""

    name: str
    """The name its result file carries (``<name>.json``)."""
    module: list[str]
    """``python -m`` arguments before ``--out``."""
    gpu_seconds: int
    """Time box on the GPU (seconds): a part past it is killed and reported. Sized from
    the H200 runs in benchmarks/results/ (Triton compiles and autotunes every new shape:
    about 2 s a config there, most of the kernel tests' and sharded step's time)."""
    dry_run_seconds: int
    """Time box of the dry run on a CPU (CI's machine: 2 slow cores)."""


KERNEL_TESTS = Part("kernel_tests", ["benchmarks.gpu_check.pytest_part", "kernel_tests"], 170, 300)
SHARDED_STEP = Part("sharded_step", ["benchmarks.gpu_check.pytest_part", "sharded_step"], 150, 300)
STAGES = [
    # Tests only, no timings: they share the GPU (and the 16 CPUs that compile Triton).
    [KERNEL_TESTS, SHARDED_STEP],
    # Each measures time, so each has the machine to itself.
    [Part("kernel_speed", ["benchmarks.gpu_check.kernel_speed"], 90, 300)],
    [Part("deepspeed_train", ["benchmarks.gpu_check.deepspeed_train"], 100, 600)],
    [Part("megatron_train", ["benchmarks.gpu_check.megatron_train"], 200, 600)],
]
"""Parts in order; the parts of one stage run at the same time."""
PARTS = [part for stage in STAGES for part in stage]
PACKAGES = ("torch", "triton", "deepspeed", "megatron-core", "emerging-optimizers", "muon_ds")


def versions() -> dict[str, str | None]:
    """Python and the packages the check depends on, as installed here."""

    def version(name: str) -> str | None:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            return None

    found = {"python": platform.python_version(), "cuda": torch.version.cuda}
    return found | {name: version(name) for name in PACKAGES}


def run_stage(parts: list[Part], out: Path, dry_run: bool) -> list[tuple[PartResult, float]]:
    """Start every part of a stage, each in its own process group, and watch them: a part
    ends when its process does, or is killed with its group when its box ends. The
    parts' results with their own seconds, in order."""
    began = time.monotonic()
    running = {part.name: (part, *start(part, out, dry_run)) for part in parts}
    ended: dict[str, tuple[PartResult, float]] = {}
    while running:
        time.sleep(0.5)
        for name, (part, child, box) in list(running.items()):
            seconds = time.monotonic() - began
            if child.poll() is not None:
                problem = None if child.returncode == 0 else f"exit status {child.returncode}"
            elif seconds > box:
                os.killpg(child.pid, signal.SIGKILL)
                child.wait()
                problem = f"killed at its {box} s time box"
            else:
                continue
            ended[name] = (collect(part, out, problem, began), seconds)
            del running[name]
    return [ended[part.name] for part in parts]


def start(part: Part, out: Path, dry_run: bool) -> tuple[subprocess.Popen, int]:
    """The part's process (output to ``out/<part>.log``) and its time box."""
    box = part.dry_run_seconds if dry_run else part.gpu_seconds
    command = [sys.executable, "-m", *part.module, "--out", str(out)]
    command += ["--dry-run"] if dry_run else []
    print(f"== {part.name} (box {box} s): {' '.join(command)}", flush=True)
    with (out / f"{part.name}.log").open("w") as sink:
        child = subprocess.Popen(
            command, stdout=sink, stderr=subprocess.STDOUT, start_new_session=True
        )
    return child, box


def collect(part: Part, out: Path, problem: str | None, began: float) -> PartResult:
    """The result the part wrote in this run, failed with the log's tail on a problem."""
    tail = (out / f"{part.name}.log").read_text(errors="replace")[-3000:]
    print(f"== {part.name}: {problem or 'done'}\n{tail[-1500:]}", flush=True)
    result_file = out / f"{part.name}.json"
    started = time.time() - (time.monotonic() - began)
    if result_file.exists() and result_file.stat().st_mtime >= started - 1:
        result = PartResult(**json.loads(result_file.read_text()))
    else:
        result = PartResult(part.name, ok=False, device="", notes=["no result written"])
    if problem:
        result.ok = False
        result.notes = [problem, *result.notes, f"log tail:\n{tail}"]
    return result


def report(results: list[tuple[PartResult, float]], header: dict, dry_run: bool) -> str:
    """Markdown: what ran where, one summary row per part, then each part's own table."""
    summary = [
        {"part": r.part, "ok": "yes" if r.ok else "NO", "seconds": round(s, 1)} for r, s in results
    ]
    lines = [
        f"# muon_ds GPU check{' (dry run on CPU)' if dry_run else ''}",
        "",
        *(f"- {key}: {value}" for key, value in header.items()),
        "",
        markdown_table(summary, ["part", "ok", "seconds"]),
    ]
    for result, _ in results:
        lines += ["", f"## {result.part}", "", result.table, ""]
        lines += [f"- {note}" for note in result.notes]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("out/gpu_check"))
    parser.add_argument("--dry-run", action="store_true", help="every part on the CPU, toy sizes")
    parser.add_argument("--only", nargs="+", choices=[p.name for p in PARTS], default=None)
    args = parser.parse_args()
    if not args.dry_run and not torch.cuda.is_available():
        raise SystemExit("the GPU check needs a CUDA GPU (torch sees none); use --dry-run on a CPU")
    args.out.mkdir(parents=True, exist_ok=True)
    device = torch.device("cpu" if args.dry_run else "cuda")
    header = {
        "device": device_name(device),
        "date (UTC)": time.strftime("%Y-%m-%d %H:%M", time.gmtime()),
        **versions(),
    }
    print("\n".join(f"{k}: {v}" for k, v in header.items()), flush=True)
    began = time.monotonic()
    results = []
    for stage in STAGES:
        chosen = [part for part in stage if part.name in (args.only or [part.name])]
        if chosen:
            results += run_stage(chosen, args.out, args.dry_run)
            header["wall seconds"] = round(time.monotonic() - began, 1)
            text = write_report(args.out, results, header, args.dry_run)  # a kill keeps it
    print(text, flush=True)
    raise SystemExit(0 if all(r.ok for r, _ in results) else 1)


def write_report(
    out: Path, results: list[tuple[PartResult, float]], header: dict, dry_run: bool
) -> str:
    """``out/report.md`` and ``out/results.json`` for the parts run so far; the report."""
    text = report(results, header, dry_run)
    (out / "report.md").write_text(text)
    everything = {"header": header, "parts": [asdict(r) | {"seconds": s} for r, s in results]}
    (out / "results.json").write_text(json.dumps(everything, indent=2, default=str) + "\n")
    return text


if __name__ == "__main__":
    main()
