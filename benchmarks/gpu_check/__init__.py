"""One prepared GPU check: ``python -m benchmarks.gpu_check`` (``make gpu-check``).

Every part is its own module, run by the driver (``__main__``) as a child process
``python -m benchmarks.gpu_check.<part> --out DIR [--dry-run]`` under its own time box, so
a part that hangs or crashes costs its box and nothing else. A part writes
``DIR/<part>.json`` through ``write_result`` and exits 0 when every check it makes held.
``--dry-run`` runs the same code on the CPU at toy sizes (the Triton interpreter for the
kernel), which is how CI keeps the check alive without a GPU.
"""

from __future__ import annotations

import json
import platform
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch


@dataclass
class PartResult:
    """What one part reports: the driver merges these into report.md and results.json."""

    part: str
    """The part's module name, e.g. ``kernel_speed``."""
    ok: bool
    """Every check the part makes held (a measurement alone is not a check)."""
    device: str
    """Where it ran, as ``device_name`` says."""
    table: str = ""
    """A markdown table (or lines) for the report: the part's headline figures."""
    rows: list[dict[str, Any]] = field(default_factory=list)
    """Every measured figure, machine-readable."""
    notes: list[str] = field(default_factory=list)
    """What failed, what was skipped and why, anything a reader must know."""


def device_name(device: torch.device) -> str:
    """The GPU's name, or the CPU's with its thread count."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"


def write_result(out: Path, result: PartResult) -> Path:
    """``out/<part>.json``; the part's exit status should be 0 exactly when ``result.ok``."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{result.part}.json"
    path.write_text(json.dumps(asdict(result), indent=2, default=str) + "\n")
    return path


def markdown_table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    """``rows`` as a markdown table of ``columns`` (floats to 4 significant digits)."""

    def cell(value: Any) -> str:
        return f"{value:.4g}" if isinstance(value, float) else str(value)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(r.get(c, "")) for c in columns) + " |" for r in rows]
    return "\n".join(lines)
