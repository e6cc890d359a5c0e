"""The communication benchmark's driver on its smallest setting: dense model, 2 gloo ranks.

Runs ``benchmarks/comm_overhead.py`` end to end for the three DeepSpeed contenders (2
measured steps after 1 warm-up) and checks what its table is trusted for: counts that are
the same every step, muon_ds orthogonalising each Muon matrix exactly once, AdamW running
no Newton-Schulz, the totals being the sums of the per-rank counts, two independent byte
counts agreeing, and a contender that fails on one rank being reported as failed instead
of hanging the run or vanishing from the table. Times are not checked.

``TORCHDYNAMO_DISABLE=1`` keeps DeepSpeed's Muon out of ``torch.compile`` here: compiling
its kernels on two loaded CPU cores costs more than this whole test, and what is checked
(counts) does not depend on it. The benchmark itself runs DeepSpeed's Muon compiled.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import pytest
import torch.distributed as dist

from benchmarks import comm_overhead, torch_models
from benchmarks.run_options import RunOptions
from benchmarks.shapes import DENSE

pytestmark = pytest.mark.dist

DEEPSPEED_CONTENDERS = ("zero1_adamw", "deepspeed_muon", "muon_ds_deepspeed")


def _fails_on_rank_1(rank: int, world: int, shape: Any, options: RunOptions) -> dict:
    """Rank 1 raises; rank 0 then waits forever in a collective, as a real failure leaves it."""
    dist.init_process_group("gloo")
    if rank == 1:
        raise ValueError("rank 1 refuses this layout")
    dist.barrier()
    return {}


CONTENDERS = {"fails_on_rank_1": _fails_on_rank_1}
LAYOUTS = {("dense", 2): ["DP=2"]}


def run_uncompiled(contenders: tuple[str, ...], out: Path, warmup: int) -> dict[str, Any]:
    """The benchmark on its smallest setting (dense, 2 ranks, 2 measured steps) with
    ``TORCHDYNAMO_DISABLE=1`` (see the module docstring); its records by contender."""
    saved = os.environ.get("TORCHDYNAMO_DISABLE")
    os.environ["TORCHDYNAMO_DISABLE"] = "1"
    try:
        records = comm_overhead.main(
            [
                *("--models", "dense", "--worlds", "2", "--steps", "2"),
                *("--warmup", str(warmup), "--contenders", *contenders, "--out", str(out)),
            ]
        )
    finally:
        if saved is None:
            os.environ.pop("TORCHDYNAMO_DISABLE")
        else:
            os.environ["TORCHDYNAMO_DISABLE"] = saved
    return {r["contender"]: r for r in records}


@pytest.fixture(scope="module")
def benchmark(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], Path]:
    out = tmp_path_factory.mktemp("comm_overhead")
    return run_uncompiled(DEEPSPEED_CONTENDERS, out, warmup=1), out


def test_every_deepspeed_contender_runs_with_the_same_counts_every_step(benchmark) -> None:
    runs, _ = benchmark
    assert sorted(runs) == sorted(DEEPSPEED_CONTENDERS)
    for name, run in runs.items():
        assert run["status"] == "ok", (name, run.get("error"))
        assert [r["rank"] for r in run["ranks"]] == [0, 1]
        assert all(r["counts_constant"] for r in run["ranks"]), name


def test_muon_ds_orthogonalises_each_matrix_once_and_adamw_never(benchmark) -> None:
    runs, _ = benchmark
    matrices = len(torch_models.muon_matrices(torch_models.build(DENSE, seed=0)))
    ours = runs["muon_ds_deepspeed"]["summary"]
    assert ours["logical_matrices"] == matrices
    assert ours["ns_calls_total"] == matrices
    assert ours["ns_redundancy"] == 1.0
    adamw = runs["zero1_adamw"]["ranks"]
    assert [(r["ns_calls_per_step"], r["ns_flops_per_step"]) for r in adamw] == [(0, 0), (0, 0)]
    # DeepSpeed's Muon orders its matrices by size, so at DP=2 one of them straddles the
    # two partitions and both of its holders orthogonalise it.
    assert runs["deepspeed_muon"]["summary"]["ns_redundancy"] > 1.0


def test_totals_are_the_sums_of_the_per_rank_counts(benchmark) -> None:
    runs, out = benchmark
    written = {r["contender"]: r for r in json.loads((out / "results.json").read_text())["runs"]}
    for name, run in runs.items():
        ranks, summary = run["ranks"], run["summary"]
        for key in ("wire", "payload", "calls"):
            per_rank = sum(op[key] for r in ranks for op in r["collectives_per_step"].values())
            assert summary[f"{key}_total"] == per_rank, (name, key)
        assert summary["ns_calls_total"] == sum(r["ns_calls_per_step"] for r in ranks)
        assert summary["state_bytes_total"] == sum(r["state_bytes"] for r in ranks)
        assert written[name]["summary"] == summary
    assert runs["zero1_adamw"]["summary"]["wire_ratio"] == 1.0


def test_counted_bytes_match_the_model_and_muon_ds_own_count(benchmark) -> None:
    """AdamW's ZeRO-1 all-gather moves every fp32 parameter once; the collective counter and
    muon_ds's own exchange counter agree on what muon_ds's all-to-alls carry."""
    runs, _ = benchmark
    for r in runs["zero1_adamw"]["ranks"]:
        assert (
            r["collectives_per_step"]["all_gather_into_tensor"]["payload"] == 4 * r["param_count"]
        )
    for r in runs["muon_ds_deepspeed"]["ranks"]:
        exchanged = r["collectives_per_step"].get("all_to_all_single", {}).get("payload", 0)
        assert exchanged == r["own_exchange_bytes_per_step"]


def test_a_contender_failing_on_one_rank_is_reported_failed_without_hanging(tmp_path) -> None:
    run = comm_overhead.Run(__name__, "fails_on_rank_1", DENSE, 2, "DP=2")
    start = time.monotonic()
    record = comm_overhead.run_one(run, RunOptions(steps=1), tmp_path, timeout=120, grace=5)
    assert time.monotonic() - start < 60
    assert record["status"] == "failed"
    assert record["error"] == "rank 1: ValueError: rank 1 refuses this layout"
    table = comm_overhead.markdown_table(comm_overhead.aggregate([record]))
    assert "| dense | DP=2 | fails_on_rank_1 | FAILED: rank 1: ValueError" in table
