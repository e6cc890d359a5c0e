"""The Megatron contenders of the communication benchmark count what they claim to count.

One spawn of 4 gloo ranks at TP=2 x DP=2 runs every contender of
``benchmarks.megatron_contenders`` in turn, through its ``CONTENDERS`` entry, on a tiny
bf16 dense GPT (2 layers, hidden 64, GQA). Checked exactly, from counts only:

* every measured step issues the same collectives and the same Newton-Schulz work;
* the distinct Muon matrices match the model: 7 per layer for muon_ds (Q, K, V, proj,
  gate, up, fc2), 6 for Megatron's Muon (it never splits gate/up);
* NS calls over all ranks: muon_ds once per matrix (redundancy 1.00); Megatron's
  layer-wise optimizer once per TP rank (TP, its duplicated TP mode); Megatron's Muon
  without a distributed optimizer on every rank (TP x DP);
* NS FLOPs over all ranks equal ``newton_schulz_flops`` of those matrices times the
  redundancy, counted independently for each framework;
* muon_ds's all-to-all bytes (seen by the shared collective counter) equal both its own
  counter and its plans' prediction.
"""

from __future__ import annotations

from typing import Any

import pytest

from benchmarks.run_options import RunOptions
from benchmarks.shapes import ModelShape
from muon_ds.math import newton_schulz_flops
from tests.dist.zero1 import run_ranks

pytestmark = pytest.mark.dist

TP, DP = 2, 2
LAYOUT = f"TP={TP}xDP={DP}"
TINY = ModelShape(
    name="dense",
    layers=2,
    hidden=64,
    heads=4,
    query_groups=2,
    ffn=128,
    vocab=128,
    seq=16,
    micro_batch=2,
)
OPTIONS = RunOptions(steps=3, warmup=1, dtype="bf16", layout=LAYOUT)
CONTENDERS = (
    "megatron_adam",
    "megatron_muon_layerwise",
    "megatron_muon_duplicated",
    "muon_ds_megatron",
)


def _run_all(rank: int, world: int) -> dict[str, dict[str, Any]]:
    from muon_ds.testing import collectives

    collectives.install()  # before Megatron is imported, as the driver does
    from benchmarks.megatron_contenders import CONTENDERS as RUNS

    return {name: RUNS[name](rank, world, TINY, OPTIONS) for name in CONTENDERS}


@pytest.fixture(scope="module")
def results() -> dict[str, list[dict[str, Any]]]:
    by_rank = run_ranks(TP * DP, _run_all, timeout=480)
    return {name: [ranks[name] for ranks in by_rank] for name in CONTENDERS}


def _matrices(gate_up_split: bool) -> list[tuple[int, int]]:
    head_dim = TINY.hidden // TINY.heads
    q = (TINY.heads * head_dim, TINY.hidden)
    kv = (TINY.query_groups * head_dim, TINY.hidden)
    proj = (TINY.hidden, TINY.heads * head_dim)
    fc1 = [(TINY.ffn, TINY.hidden)] * 2 if gate_up_split else [(2 * TINY.ffn, TINY.hidden)]
    fc2 = (TINY.hidden, TINY.ffn)
    return [q, kv, kv, proj, *fc1, fc2] * TINY.layers


def _flops(matrices: list[tuple[int, int]]) -> int:
    return sum(newton_schulz_flops(rows, cols, 5) for rows, cols in matrices)


def test_every_measured_step_issues_the_same_collectives_and_newton_schulz(results) -> None:
    for name, ranks in results.items():
        assert all(r["counts_constant"] for r in ranks), name
        assert all(r["collectives_per_step"] for r in ranks), name


def test_muon_ds_orthogonalises_each_logical_matrix_exactly_once(results) -> None:
    ranks = results["muon_ds_megatron"]
    matrices = _matrices(gate_up_split=True)
    assert {r["logical_matrices"] for r in ranks} == {len(matrices)}
    assert sum(r["ns_calls_per_step"] for r in ranks) == len(matrices)
    assert sum(r["ns_flops_per_step"] for r in ranks) == _flops(matrices)


def test_megatron_muon_repeats_newton_schulz_tp_times_layerwise_and_world_times_duplicated(
    results,
) -> None:
    matrices = _matrices(gate_up_split=False)
    for name, redundancy in (
        ("megatron_muon_layerwise", TP),
        ("megatron_muon_duplicated", TP * DP),
    ):
        ranks = results[name]
        assert {r["logical_matrices"] for r in ranks} == {len(matrices)}, name
        assert sum(r["ns_calls_per_step"] for r in ranks) == redundancy * len(matrices), name
        assert sum(r["ns_flops_per_step"] for r in ranks) == redundancy * _flops(matrices), name


def test_adam_runs_no_newton_schulz(results) -> None:
    assert all(r["ns_calls_per_step"] == 0 for r in results["megatron_adam"])


def test_muon_ds_exchange_bytes_are_the_plans_prediction(results) -> None:
    for r in results["muon_ds_megatron"]:
        counted = r["collectives_per_step"]["all_to_all_single"]["payload"]
        assert r["plan_exchange_bytes_per_step"] > 0
        assert counted == r["muon_ds_exchange_bytes_per_step"] == r["plan_exchange_bytes_per_step"]
