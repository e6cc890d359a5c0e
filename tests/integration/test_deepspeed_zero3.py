"""muon_ds through DeepSpeed ZeRO stage 3 on gloo CPU ranks, against single-process Muon
and against muon_ds on ZeRO-2.

Each rank trains ``TinyLM`` with ``"type": "MuonDS"`` under stage 3 and replays the same
steps on an unsharded copy with ``muon_ds.Muon`` (``test_deepspeed._reference``). Full fp32
params and optimizer state are read back through DeepSpeed's ``safe_get_full_*`` helpers,
which under stage 3 gather our state from every rank's sub-group partitions.
Tolerance: as in ``test_deepspeed``: fp32 Newton-Schulz, only the reduction order differs
(2e-5 on updates of ~1e-2). Against ZeRO-2, the same muon_ds on the same gradients: the
partitions differ, so only the gradient reduction order and the owners change.
"""

from __future__ import annotations

import contextlib
from typing import Any

import pytest
import torch

from tests.dist.zero1 import run_ranks
from tests.integration.deepspeed_harness import TinyLM, batch, ds_config, use_gloo_only
from tests.integration.test_deepspeed import (
    MATRICES,
    MUON_PARAMS,
    STEPS,
    TOL,
    _compare,
    _reference,
    _train,
)

TINY_SUB_GROUP = 300
"""A ``sub_group_size`` that cuts TinyLM's parameters into several ZeRO-3 sub-groups
(each closes once it reaches this many partition elements), so one step calls the
optimizer once per sub-group."""


def _engine3(config: dict[str, Any], zero_init: bool) -> Any:
    """An engine over a fresh TinyLM, built inside ``zero.Init`` when ``zero_init``
    (its parameters then arrive partitioned, their data empty)."""
    import deepspeed

    import muon_ds.deepspeed  # noqa: F401  (registers "MuonDS")

    torch.manual_seed(0)
    scope = (
        deepspeed.zero.Init(config_dict_or_path=config) if zero_init else contextlib.nullcontext()
    )
    with scope:
        model = TinyLM()
    engine, *_ = deepspeed.initialize(
        model=model, model_parameters=model.parameters(), config=config
    )
    return engine


def _stage3(sub_group_size: int | None = None, **overrides: Any) -> dict[str, Any]:
    zero = {"stage": 3}
    if sub_group_size is not None:
        zero["sub_group_size"] = sub_group_size
    return ds_config({"type": "MuonDS", "params": MUON_PARAMS}, zero_optimization=zero, **overrides)


CASES: dict[str, tuple[dict[str, Any], int, float, bool]] = {
    # name: (config, gradient accumulation, clipping, zero.Init)
    "default_sub_group": (_stage3(), 1, 0.0, False),
    "tiny_sub_group": (_stage3(TINY_SUB_GROUP), 1, 0.0, False),
    "gas2_clip_tiny_sub_group": (
        _stage3(TINY_SUB_GROUP, gradient_accumulation_steps=2, gradient_clipping=0.05),
        2,
        0.05,
        False,
    ),
    "zero_init": (_stage3(), 1, 0.0, True),
    "zero_init_tiny_sub_group_gas2": (
        _stage3(TINY_SUB_GROUP, gradient_accumulation_steps=2),
        2,
        0.0,
        True,
    ),
}


def _zero3_cases(rank: int, world: int) -> dict[str, Any]:
    use_gloo_only(rank, world)
    results: dict[str, Any] = {}
    for name, (config, gas, clip, zero_init) in CASES.items():
        engine = _engine3(config, zero_init)
        _train(engine, rank, gas, range(STEPS))
        reference, optimizer, raw_norm = _reference(world, gas, clip, MUON_PARAMS)
        basic = engine.basic_optimizer
        results[name] = {
            "wrapper": type(engine.optimizer).__name__,
            "sub_groups": len(engine.optimizer.fp16_groups),
            "errors": _compare(engine, reference, optimizer),
            "raw_norm": raw_norm,
            "grad_norm": float(engine.get_global_grad_norm()),
            "ns_matrices": basic.ns_matrices(),
            "exchange_bytes": basic.exchange_bytes(),
            "planned_bytes": STEPS
            * sum(core.planned_bytes()["dense"] for core in basic._cores.values()),
            "routes": basic.routing_report().routes(),
        }
    return results


@pytest.fixture(scope="module", params=[2, 3, 4], ids=["dp2", "dp3", "dp4"])
def zero3_runs(request: pytest.FixtureRequest) -> tuple[int, list[dict[str, Any]]]:
    return request.param, run_ranks(request.param, _zero3_cases, timeout=900)


@pytest.mark.parametrize("case", sorted(CASES))
def test_zero3_training_equals_single_process_muon(zero3_runs, case: str) -> None:
    _, results = zero3_runs
    for result in results:
        outcome = result[case]
        assert outcome["wrapper"] == "DeepSpeedZeroOptimizer_Stage3"
        assert max(outcome["errors"].values()) <= TOL, outcome["errors"]


def test_tiny_sub_groups_step_several_partitions(zero3_runs) -> None:
    _, results = zero3_runs
    assert results[0]["tiny_sub_group"]["sub_groups"] >= 4
    assert results[0]["default_sub_group"]["sub_groups"] == 2  # the Muon half, the AdamW half


@pytest.mark.parametrize("case", sorted(CASES))
def test_each_matrix_is_orthogonalised_once_per_step_across_ranks(zero3_runs, case) -> None:
    _, results = zero3_runs
    assert sum(r[case]["ns_matrices"] for r in results) == STEPS * len(MATRICES)


@pytest.mark.parametrize("case", sorted(CASES))
def test_counted_exchange_bytes_equal_the_plan(zero3_runs, case: str) -> None:
    _, results = zero3_runs
    for result in results:
        assert result[case]["exchange_bytes"] == result[case]["planned_bytes"]
        assert result[case]["exchange_bytes"] > 0  # every matrix spans every rank


def test_zero_init_routes_by_the_full_shape(zero3_runs) -> None:
    """Under zero.Init the parameters' data are empty; routing still sees the matrices."""
    _, results = zero3_runs
    routes = results[0]["zero_init"]["routes"]
    assert routes == results[0]["default_sub_group"]["routes"]
    assert {n for n, r in routes.items() if r == "muon"} == set(MATRICES)


def test_clipping_and_the_reported_norm_use_the_raw_gradient(zero3_runs) -> None:
    _, results = zero3_runs
    outcome = results[0]["gas2_clip_tiny_sub_group"]
    assert outcome["grad_norm"] == pytest.approx(outcome["raw_norm"], rel=1e-5)
