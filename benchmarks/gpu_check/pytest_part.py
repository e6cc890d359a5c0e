"""GPU check, parts a and c: the project's own tests, run on the GPU.

``kernel_tests`` (part a): the Newton-Schulz reference's tests, the Triton kernel's
tests and the AdamW part's bit-for-bit test with ``MUON_DS_TEST_DEVICE=cuda``: the
kernel compiled, not interpreted, and AdamW through torch's fused CUDA kernel.
``sharded_step`` (part c): the gloo multi-process tests of the sharded step (owner teams
included) with every buffer on the GPU (gloo carries CUDA tensors; NCCL refuses two ranks
on one GPU): equal to single-process Muon on the same GPU, bucketed overlap included, and
the host synchronisations of each step counted. ``--dry-run`` runs a few of the same tests on the
CPU, so the wiring stays alive in CI without duplicating the suite.

    python -m benchmarks.gpu_check.pytest_part {kernel_tests,sharded_step} --out DIR [--dry-run]
"""

from __future__ import annotations

import argparse
import os
import xml.etree.ElementTree as ElementTree
from pathlib import Path

import pytest
import torch

from benchmarks.gpu_check import PartResult, device_name, markdown_table, write_result

SUITES: dict[str, tuple[list[str], list[str]]] = {
    "kernel_tests": (
        [
            "tests/unit/test_newton_schulz.py",
            "tests/unit/test_triton_newton_schulz.py",
            "tests/unit/test_muon.py::test_adamw_part_equals_torch_adamw_bit_for_bit",
        ],
        ["tests/unit/test_triton_newton_schulz.py", "-k", "symmetric_product"],
    ),
    "sharded_step": (
        [
            "tests/dist/test_sharded_muon.py",
            "tests/dist/test_owner_teams.py",
            "-k",
            "not bad_input and not non_finite",
        ],
        ["tests/dist/test_sharded_muon.py", "-k", "data_parallel_shards and dp2"],
    ),
}
"""Part -> (pytest arguments on the GPU, pytest arguments in a dry run)."""


def outcomes(junit: Path) -> list[dict[str, str | float]]:
    """One row per test case of pytest's JUnit XML: name, outcome, seconds, message."""
    rows = []
    for case in ElementTree.parse(junit).getroot().iter("testcase"):
        outcome, message = "passed", ""
        for tag in ("failure", "error", "skipped"):
            found = case.find(tag)
            if found is not None:
                outcome = "failed" if tag == "failure" else tag
                message = (found.get("message") or "")[:500]
        rows.append(
            {
                "test": case.get("name", ""),
                "outcome": outcome,
                "seconds": float(case.get("time", 0.0)),
                "message": message,
            }
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("suite", choices=sorted(SUITES))
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--dry-run", action="store_true", help="a few of the tests, on the CPU")
    args = parser.parse_args()
    device = torch.device("cpu" if args.dry_run else "cuda")
    # Read by tests/conftest.py when pytest imports it, and inherited by every rank.
    os.environ["MUON_DS_TEST_DEVICE"] = device.type
    gpu_args, dry_run_args = SUITES[args.suite]
    junit = args.out / f"{args.suite}.junit.xml"
    args.out.mkdir(parents=True, exist_ok=True)
    status = pytest.main(
        [
            *(dry_run_args if args.dry_run else gpu_args),
            "-v",  # each test's name as it ends: a part killed at its box shows where
            "--durations=10",
            "-p",
            "no:cacheprovider",
            f"--junitxml={junit}",
        ]
    )
    rows = outcomes(junit)
    counts = {
        o: sum(r["outcome"] == o for r in rows) for o in ("passed", "failed", "error", "skipped")
    }
    problems = [
        f"{r['test']}: {r['outcome']}: {r['message']}" for r in rows if r["outcome"] != "passed"
    ]
    result = PartResult(
        part=args.suite,
        ok=status == 0 and counts["passed"] > 0,
        device=device_name(device),
        table=markdown_table([counts], list(counts)),
        rows=rows,
        notes=[f"pytest exit status {status}", *problems],
    )
    write_result(args.out, result)
    raise SystemExit(0 if result.ok else 1)


if __name__ == "__main__":
    main()
