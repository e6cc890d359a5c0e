"""ShardedMuon on real gloo ranks against single-process ``muon_ds.Muon``.

Every scenario runs the reference Muon on the unsharded model inside each rank (same
seeds, same gradients), and each rank checks the elements it holds, so together the
ranks check every element. Counted quantities are asserted exactly.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

from muon_ds import Muon, MuonConfig
from muon_ds.sharded import ShardedMuon
from tests.dist.models import (
    DENSE_SHAPES,
    MOE_SHAPES,
    TP_SHAPES,
    dense_dp_locals,
    make_grads,
    make_params,
    moe_locals,
    tp_locals,
)
from tests.dist.zero1 import read_shard, run_ranks, set_shard_grads, zero1_shard

STEPS = 3
FP32_TOL = 2e-6
"""fp32 Newton-Schulz on both sides: only matmul summation order can differ."""


def _reference(shapes: dict[str, tuple[int, ...]], config: MuonConfig, steps: int):
    params = make_params(shapes)
    optimizer = Muon(list(params.items()), config)
    for step in range(steps):
        for name, grad in make_grads(shapes, step).items():
            params[name].grad = grad
        optimizer.step()
    return params


def _max_errors(shard, locals_after: list, skip: set[str] = frozenset()) -> dict[str, float]:
    errors = {}
    for lp in locals_after:
        got = read_shard(shard, lp.name)
        if got is None or lp.name in skip:
            continue
        start, end, values = got
        expected = lp.values.reshape(-1)[start:end].float()
        errors[lp.name] = (values - expected).abs().max().item()
    return errors


def _report(optimizer: ShardedMuon, shard, group_ranks: dict[str, int]) -> dict[str, Any]:
    buffers = [(g["algorithm"], b) for g in shard.param_groups for b in g["params"]]
    wire = 4 if optimizer.config.ns_dtype == "float32" else 2
    return {
        "ns_matrices": optimizer.counter.ns_matrices,
        "matrices": {k: len(p.matrices) for k, p in optimizer.plans.items()},
        "bytes": {
            key: sum(
                n
                for (op, g), n in optimizer.counter.bytes_sent.items()
                if g == key and op.startswith("muon_")
            )
            for key in optimizer.plans
        },
        "predicted": {
            key: plan.bytes_sent(group_ranks[key], wire) * STEPS
            for key, plan in optimizer.plans.items()
        },
        "imbalance": {k: p.imbalance() for k, p in optimizer.plans.items()},
        "state_bytes": optimizer.state_bytes(),
        "expected_state_bytes": sum(
            (4 if algorithm == "muon" else 8) * b.numel() for algorithm, b in buffers
        ),
    }


# --- pure data parallel -------------------------------------------------------------------


def _dense_dp(rank: int, world: int, config: MuonConfig) -> dict[str, Any]:
    full = make_params(DENSE_SHAPES)
    shard = zero1_shard({"dense": (dense_dp_locals(full, config), rank, world)})
    optimizer = ShardedMuon(shard.param_groups, shard.views, config)
    for step in range(STEPS):
        set_shard_grads(shard, make_grads(DENSE_SHAPES, step))
        optimizer.step()
    reference = _reference(DENSE_SHAPES, config, STEPS)
    return {
        "errors": _max_errors(shard, dense_dp_locals(reference, config)),
        **_report(optimizer, shard, {"dense": rank}),
    }


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("ns_dtype", ["float32", "bfloat16"])
def test_data_parallel_shards_match_single_process_muon(world: int, ns_dtype: str) -> None:
    config = MuonConfig(ns_dtype=ns_dtype)
    results = run_ranks(world, _dense_dp, config)
    tolerance = FP32_TOL if ns_dtype == "float32" else 0.0
    for rank, result in enumerate(results):
        worst = max(result["errors"].values())
        assert worst <= tolerance, (rank, result["errors"])
