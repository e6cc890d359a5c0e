"""Newton-Schulz speed: the torch reference, muon_ds's fused Triton kernel, flash-muon.

Times 5 Moonlight steps on the shapes Muon meets: square matrices, 1:4 rectangles and a
layer's worth of expert matrices in one batched call. Each figure is the median of
``--repeats`` timed runs after ``--warmup`` runs (the first one also autotunes the
kernel), with the device synchronised around every run. TFLOP/s divides the reference's
FLOP count (``newton_schulz_flops``) by the time, for every implementation alike, so the
kernel's ratio of TFLOP/s is its speed-up even though exploiting symmetry means it does
fewer FLOPs.

The kernel and flash-muon need a CUDA GPU. On the CPU only the torch reference runs, at
small sizes (``--quick``, the default there), and the report says so.

    .venv/bin/python -m benchmarks.newton_schulz [--no-quick] [--out out/newton_schulz]
"""

from __future__ import annotations

import argparse
import functools
import importlib.metadata
import json
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import matplotlib
import torch

from muon_ds.math import newton_schulz, newton_schulz_flops

STEPS = 5
CPU_NOTE = (
    "No CUDA GPU: only the torch reference ran. The Triton kernel and flash-muon figures "
    "(and every speed-up) need a GPU."
)
Case = tuple[str, tuple[int, int, int]]  # label, (batch, rows, cols)

FULL_CASES: list[Case] = [
    *[(f"{n}x{n}", (1, n, n)) for n in (1024, 2048, 4096, 8192)],
    *[(f"{n}x{4 * n}", (1, n, 4 * n)) for n in (1024, 2048, 4096)],
    ("64 experts 1408x2048", (64, 1408, 2048)),
]
QUICK_CASES: list[Case] = [
    *[(f"{n}x{n}", (1, n, n)) for n in (256, 512)],
    *[(f"{n}x{4 * n}", (1, n, 4 * n)) for n in (128, 256)],
    ("8 experts 176x256", (8, 176, 256)),
]


def implementations(device: torch.device) -> dict[str, Callable[[torch.Tensor], torch.Tensor]]:
    """What can run on ``device``: the reference always; the kernel and flash-muon (if
    installed) on CUDA. flash-muon orthogonalises one matrix per call, so a batch loops."""
    found: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
        "torch reference": lambda x: newton_schulz(x, steps=STEPS)
    }
    if device.type != "cuda":
        return found
    from muon_ds.kernels.triton_newton_schulz import newton_schulz_triton

    found["muon_ds triton"] = lambda x: newton_schulz_triton(x, steps=STEPS)
    try:
        from flash_muon import fast_newtonschulz
    except ImportError:
        return found
    found["flash-muon"] = lambda x: torch.stack([fast_newtonschulz(m, STEPS) for m in x])
    return found


def median_seconds(
    run: Callable[[], object], device: torch.device, warmup: int, repeats: int
) -> float:
    """Median wall time of ``run``, synchronising the GPU so its queued work is counted."""

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for _ in range(warmup):
        run()
    times = []
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        run()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"


def package_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def benchmark(cases: list[Case], device: torch.device, warmup: int, repeats: int) -> list[dict]:
    """One row per (case, implementation): median ms, TFLOP/s, speed-up over the reference."""
    rows = []
    for label, (batch, m, n) in cases:
        x = torch.randn(batch, m, n, device=device, dtype=torch.bfloat16)
        flops = batch * newton_schulz_flops(m, n, STEPS)
        reference_s = None
        for name, fn in implementations(device).items():
            seconds = median_seconds(functools.partial(fn, x), device, warmup, repeats)
            reference_s = reference_s or seconds  # the reference comes first
            rows.append(
                {
                    "case": label,
                    "batch": batch,
                    "rows": m,
                    "cols": n,
                    "implementation": name,
                    "median_ms": 1e3 * seconds,
                    "tflops": flops / seconds / 1e12,
                    "speedup_vs_reference": reference_s / seconds,
                }
            )
            print(
                f"{label:>22} {name:>16}: {1e3 * seconds:10.2f} ms "
                f"{flops / seconds / 1e12:8.3f} TFLOP/s  x{reference_s / seconds:.2f}",
                flush=True,
            )
    return rows


def plot(rows: list[dict], title: str, path: Path) -> None:
    """Grouped bars of TFLOP/s: one group per case, one bar per implementation."""
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cases = list(dict.fromkeys(r["case"] for r in rows))
    names = list(dict.fromkeys(r["implementation"] for r in rows))
    width = 0.8 / len(names)
    fig, ax = plt.subplots(figsize=(max(6.0, 1.3 * len(cases)), 4.0))
    for k, name in enumerate(names):
        tflops = {r["case"]: r["tflops"] for r in rows if r["implementation"] == name}
        xs = [i + k * width for i, c in enumerate(cases) if c in tflops]
        ax.bar(xs, [tflops[c] for c in cases if c in tflops], width, label=name)
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(cases))], cases, rotation=30, ha="right")
    ax.set_ylabel(f"TFLOP/s (reference FLOPs, {STEPS} steps)")
    ax.set_title(title, fontsize=9)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--quick",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="small shapes (default on CPU; on a GPU the default is the full set)",
    )
    parser.add_argument("--warmup", type=int, default=2, help="untimed runs per measurement")
    parser.add_argument("--repeats", type=int, default=None, help="timed runs (GPU 20, CPU 3)")
    parser.add_argument(
        "--out", type=Path, default=Path("out/newton_schulz"), help="writes OUT.json, OUT.png"
    )
    args = parser.parse_args()

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    quick = device.type == "cpu" if args.quick is None else args.quick
    repeats = args.repeats or (20 if device.type == "cuda" else 3)
    name = device_name(device)
    print(f"device: {name}; torch {torch.__version__}; {'quick' if quick else 'full'} sizes")
    note = "" if device.type == "cuda" else CPU_NOTE
    if note:
        print(note)
    rows = benchmark(QUICK_CASES if quick else FULL_CASES, device, args.warmup, repeats)

    args.out.parent.mkdir(parents=True, exist_ok=True)
    report = {
        "device": name,
        "note": note,
        "versions": {pkg: package_version(pkg) for pkg in ("torch", "triton", "flash-muon")},
        "steps": STEPS,
        "coefficients": "moonlight",
        "dtype": "bfloat16",
        "warmup": args.warmup,
        "repeats": repeats,
        "quick": quick,
        "rows": rows,
    }
    json_path, png_path = args.out.with_suffix(".json"), args.out.with_suffix(".png")
    json_path.write_text(json.dumps(report, indent=2) + "\n")
    plot(rows, f"Newton-Schulz, bf16, {STEPS} steps: {name}", png_path)
    print(f"wrote {json_path} and {png_path}")


if __name__ == "__main__":
    main()
