"""The GPU check stays runnable without a GPU: its dry run and its offline wheelhouse.

``python -m benchmarks.gpu_check --dry-run`` runs every part on the CPU at toy sizes (the
kernel under Triton's interpreter, DeepSpeed's CPU accelerator, Megatron on gloo ranks):
the same code the GPU run executes, so a change that breaks the check fails here, not on
the first GPU. The wheelhouse is built from the registry (as ``make wheelhouse`` does) and
installed the way the offline GPU machine installs it.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from benchmarks.gpu_check.__main__ import PARTS, Part, run_stage

ROOT = Path(__file__).resolve().parents[2]


def _run(command: list[str], timeout: float, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        command,
        cwd=ROOT,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[subprocess.CompletedProcess, Path]:
    out = tmp_path_factory.mktemp("gpu_check")
    done = _run(
        [sys.executable, "-m", "benchmarks.gpu_check", "--dry-run", "--out", str(out)], 1500
    )
    return done, out


def test_dry_run_runs_every_part_and_every_check_holds(dry_run) -> None:
    done, out = dry_run
    assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    parts = {p["part"]: p for p in results["parts"]}
    assert list(parts) == [p.name for p in PARTS]
    for name, part in parts.items():
        assert part["ok"], (name, part["notes"])
        assert part["table"], name


def test_dry_run_report_names_the_device_and_every_part(dry_run) -> None:
    _, out = dry_run
    report = (out / "report.md").read_text()
    assert "(dry run on CPU)" in report
    assert "- device: cpu" in report
    for part in PARTS:
        assert f"## {part.name}" in report


def test_a_part_past_its_box_is_killed_and_reported_while_the_others_finish(
    tmp_path: Path,
) -> None:
    sleeper = Part("sleeper", ["tests.integration.gpu_check_sleeper"], 1, 1)
    quick = Part("kernel_tests", ["benchmarks.gpu_check.pytest_part", "kernel_tests"], 1, 120)
    began = time.monotonic()
    (stuck, stuck_seconds), (done, _) = run_stage([sleeper, quick], tmp_path, dry_run=True)
    assert time.monotonic() - began < 120
    assert stuck_seconds < 10
    assert not stuck.ok
    assert stuck.notes[0] == "killed at its 1 s time box"
    assert done.ok, done.notes


@pytest.fixture(scope="module")
def wheelhouse(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("wheelhouse")
    done = _run([sys.executable, "-m", "benchmarks.wheelhouse", "--out", str(out)], 900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return out


def test_wheelhouse_holds_the_frameworks_and_never_torch_or_triton(wheelhouse: Path) -> None:
    names = sorted(w.name for w in wheelhouse.glob("*.whl"))
    for needed in ("muon_ds-", "deepspeed-", "megatron_core-", "emerging_optimizers-"):
        assert any(n.startswith(needed) for n in names), (needed, names)
    assert not [n for n in names if n.startswith(("torch-", "triton-", "nvidia"))], names
    assert sum(w.stat().st_size for w in wheelhouse.glob("*.whl")) <= 60 * 2**20


def test_wheelhouse_installs_offline_into_a_private_folder(
    wheelhouse: Path, tmp_path: Path
) -> None:
    target = tmp_path / "site"
    script = ROOT / "benchmarks/gpu_check/install_wheels.sh"
    done = _run(["bash", str(script), str(wheelhouse), str(target)], 300, PYTHON=sys.executable)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    installed = {d.metadata["Name"] for d in importlib.metadata.distributions(path=[str(target)])}
    assert {"deepspeed", "megatron-core", "emerging-optimizers", "muon_ds"} <= installed
