"""Owner teams on real gloo ranks: one matrix orthogonalised by a team of 2 or 4 ranks.

Two levels. ``team_newton_schulz`` itself, each rank a column block of one matrix,
against single-process ``newton_schulz``: in fp32 only the order of the team sums
differs, so 1e-5; in bf16 the team sums round each member's part of ``X X^T`` before
adding, and the error against an fp64 iteration must stay within the single-process bf16
iteration's own error (``BF16_BAND`` times it). Then ``ShardedMuon`` with teams (DP, TP,
EP, teams beside whole-matrix owners, teams across ZeRO shard boundaries) against
single-process Muon in fp32 (``FP32_TOL``, as the sharded tests), with every counted
quantity equal to the plan: exchange bytes, team collective calls and bytes, and each
rank's Newton-Schulz FLOPs.

With ``MUON_DS_TEST_DEVICE=cuda`` (the GPU check) the matrices, buffers and reference
live on the GPU and gloo carries them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.distributed as dist

from muon_ds import Muon, MuonConfig
from muon_ds.layout import TensorParallel, expert_blocks
from muon_ds.math import newton_schulz
from muon_ds.math.team_newton_schulz import TeamOps, team_newton_schulz
from muon_ds.sharded import ShardedMuon
from muon_ds.teams import equal_cuts
from tests.dist.models import LocalParam, dense_dp_locals, make_grads, make_params
from tests.conftest import TEST_DEVICE
from tests.dist.zero1 import move_shard, read_shard, run_ranks, set_shard_grads, zero1_shard

STEPS = 3
FP32_TOL = 2e-6
BF16_BAND = 1.5
"""Team bf16 error (vs fp64) may be at most this times the single-process bf16 error."""

# Square, 1:3.5 and 1:5.5 (the shapes, scaled down), wide and tall.
MATH_SHAPES = [(64, 64), (32, 112), (32, 176), (112, 32)]

TEAM_SHAPES: dict[str, tuple[int, ...]] = {
    "embed.weight": (20, 16),
    "wide": (64, 224),
    "tall": (192, 48),
    "square": (40, 40),
    "small": (8, 24),
    "norm": (24,),
}
"""At DP 2, "wide" and "tall" each over a fair share (teams of 2), the others owned whole;
at DP 4, three teams of 4 and one owner."""

TP_TEAM_SHAPES: dict[str, tuple[int, ...]] = {"col": (192, 48), "row": (48, 192)}
"""At TP 2 x DP 2: a column-parallel (rows split) and a row-parallel (columns split)
matrix, each half the work, so each needs a team (the row-parallel one's member blocks
are column bands that cross its TP blocks)."""

EP_TEAM_SHAPES: dict[str, tuple[int, ...]] = {
    "attn": (24, 24),
    "experts.0.fc1": (96, 24),
    "experts.1.fc1": (96, 24),
}
"""At EP 2 x expert-DP 2, one expert per EP rank: all of its expert group's work."""


def _config(ns_dtype: str = "float32", **overrides: Any) -> MuonConfig:
    # Team bytes weigh nothing here: the test matrices are tiny, teams must still form.
    return MuonConfig(ns_dtype=ns_dtype, owner_team_max=4, team_flops_per_byte=0.0, **overrides)


# --- the iteration ------------------------------------------------------------------------


def _world_ops() -> TeamOps:
    size = dist.get_world_size()

    def sum_(tensor: torch.Tensor) -> None:
        dist.all_reduce(tensor)

    def gather_rows(part: torch.Tensor, out: torch.Tensor) -> None:
        dist.all_gather(list(out.chunk(size)), part)

    return TeamOps(sum_, gather_rows, dist.get_rank(), size)


def _iteration_errors(rank: int, world: int) -> dict[str, float]:
    """Each rank a column block of each matrix; errors of the assembled factor."""
    errors = {}
    for rows, cols in MATH_SHAPES:
        generator = torch.Generator().manual_seed(rows * cols)
        matrix = torch.randn(rows, cols, generator=generator).to(TEST_DEVICE)
        wide = matrix.mT if rows > cols else matrix
        cuts = equal_cuts(wide.size(1), world)
        block = wide[:, cuts[rank] : cuts[rank + 1]]
        exact = newton_schulz(wide, dtype=torch.float64)[:, cuts[rank] : cuts[rank + 1]]
        for dtype in (torch.float32, torch.bfloat16):
            single = newton_schulz(wide, dtype=dtype)[:, cuts[rank] : cuts[rank + 1]]
            for mode in ("replicated", "split"):
                team = team_newton_schulz(block, _world_ops(), mode=mode, dtype=dtype)
                key = f"{rows}x{cols}/{str(dtype)[6:]}/{mode}"
                errors[key + "/vs_single"] = (team.double() - single.double()).abs().max().item()
                errors[key + "/team_vs_exact"] = (team.double() - exact).norm().item() ** 2
                errors[key + "/single_vs_exact"] = (single.double() - exact).norm().item() ** 2
    return errors


@pytest.fixture(scope="module", params=[2, 4], ids=["team2", "team4"])
def iteration(request: pytest.FixtureRequest) -> list[dict[str, float]]:
    return run_ranks(request.param, _iteration_errors)


def test_team_iteration_in_fp32_equals_single_process(iteration) -> None:
    for errors in iteration:
        for key, value in errors.items():
            if "float32" in key and key.endswith("vs_single"):
                assert value <= 1e-5, (key, value)


def test_team_iteration_in_bf16_stays_in_the_bf16_error_band(iteration) -> None:
    """Frobenius error against fp64 over the whole matrix (each rank's block summed)."""
    keys = {k.rsplit("/", 1)[0] for k in iteration[0] if "bfloat16" in k}
    for key in keys:
        team = sum(e[key + "/team_vs_exact"] for e in iteration) ** 0.5
        single = sum(e[key + "/single_vs_exact"] for e in iteration) ** 0.5
        assert team <= BF16_BAND * single, (key, team, single)


# --- the optimizer ------------------------------------------------------------------------


def _reference(shapes: dict[str, tuple[int, ...]], config: MuonConfig) -> dict[str, torch.Tensor]:
    params = {name: p.to(TEST_DEVICE) for name, p in make_params(shapes).items()}
    optimizer = Muon(list(params.items()), config)
    for step in range(STEPS):
        for name, grad in make_grads(shapes, step).items():
            params[name].grad = grad.to(TEST_DEVICE)
        optimizer.step()
    return {name: p.cpu() for name, p in params.items()}


def _train(
    config: MuonConfig,
    shapes: dict[str, tuple[int, ...]],
    locals_of: Callable[[dict[str, torch.Tensor]], list[LocalParam]],
    shard: Any,
    process_groups: dict[str, Any],
    group_ranks: dict[str, int],
) -> dict[str, Any]:
    """``STEPS`` sharded steps: errors against the reference, counts and the plans' words."""
    shard = move_shard(shard(locals_of(make_params(shapes))), TEST_DEVICE)
    optimizer = ShardedMuon(shard.param_groups, shard.views, config, process_groups)
    for step in range(STEPS):
        set_shard_grads(shard, {lp.name: lp.values for lp in locals_of(make_grads(shapes, step))})
        optimizer.step()
    errors = {}
    for local in locals_of(_reference(shapes, config)):
        held = read_shard(shard, local.name)
        if held is not None:
            start, end, got = held
            errors[local.name] = (got - local.values.reshape(-1)[start:end]).abs().max().item()
    counter, wire = optimizer.counter, optimizer.core.ns_dtype.itemsize
    plans = optimizer.plans
    return {
        "errors": errors,
        "teams": {
            key: [
                (m.name, m.team.size, len({p.holder for p in m.pieces}), m.tp_size)
                for m in plan.matrices
                if m.team
            ]
            for key, plan in plans.items()
        },
        "owners": {key: sum(m.team is None for m in plan.matrices) for key, plan in plans.items()},
        "exchange": {
            key: sum(n for (op, g), n in counter.bytes_sent.items() if g == key and "muon_" in op)
            for key in plans
        },
        "exchange_planned": {
            key: STEPS * plan.bytes_sent(group_ranks[key], wire) for key, plan in plans.items()
        },
        "team": {
            (op, key): (counter.calls[(op, key)], counter.bytes_sent[(op, key)])
            for key in plans
            for op in ("team_sum", "team_gather")
        },
        "team_planned": {
            (op, key): (STEPS * calls, STEPS * nbytes)
            for key, plan in plans.items()
            for op, (calls, nbytes) in plan.team_traffic(group_ranks[key]).items()
        },
        "ns_flops": counter.ns_flops,
        "ns_flops_planned": STEPS * sum(p.ns_flops(group_ranks[k]) for k, p in plans.items()),
        "ns_calls": (counter.ns_matrices, counter.ns_team_blocks),
        "ns_calls_planned": (
            STEPS * sum(p.ns_matrices(group_ranks[k]) for k, p in plans.items()),
            STEPS
            * sum(len(p.teamed(group_ranks[k], range(len(p.matrices)))) for k, p in plans.items()),
        ),
    }


def _data_parallel(rank: int, world: int) -> dict[str, Any]:
    config = _config()
    return _train(
        config,
        TEAM_SHAPES,
        lambda full: dense_dp_locals(full, config),
        lambda locals_: zero1_shard({"dense": (locals_, rank, world)}),
        {"dense": None},
        {"dense": rank},
    )


def _tp_locals(full: dict[str, torch.Tensor], t: int, n: int) -> list[LocalParam]:
    col, row = full["col"], full["row"]
    rows, cols = col.shape[0] // n, row.shape[1] // n
    return [
        LocalParam(
            "col",
            col[t * rows : (t + 1) * rows],
            "muon",
            (rows, col.shape[1]),
            TensorParallel(t, n, 0),
        ),
        LocalParam(
            "row",
            row[:, t * cols : (t + 1) * cols],
            "muon",
            (row.shape[0], cols),
            TensorParallel(t, n, 1),
        ),
    ]


def _tensor_parallel(rank: int, world: int) -> dict[str, Any]:
    """TP=2 x DP=2 (rank = dp * 2 + tp): TP-split logical matrices in teams."""
    tp, dp = rank % 2, rank // 2
    return _train(
        _config(),
        TP_TEAM_SHAPES,
        lambda full: _tp_locals(full, tp, 2),
        lambda locals_: zero1_shard({"dense": (locals_, dp, 2)}),
        {"dense": None},
        {"dense": rank},
    )


def _ep_locals(full: dict[str, torch.Tensor], ep: int) -> list[LocalParam]:
    expert = full[f"experts.{ep}.fc1"]
    return [
        LocalParam("attn", full["attn"], "muon", tuple(full["attn"].shape)),
        LocalParam(
            "experts.fc1",
            expert,
            "muon",
            tuple(expert.shape),
            blocks=expert_blocks(expert.shape[0], 1, ep),
            group="expert",
        ),
    ]


def _expert_parallel(rank: int, world: int) -> dict[str, Any]:
    """EP=2 x expert-DP=2 (rank = edp * 2 + ep), dense DP=4: expert matrices in teams."""
    ep, edp = rank % 2, rank // 2
    expert_groups = [dist.new_group([e, e + 2]) for e in range(2)]

    def shard(locals_: list[LocalParam]) -> Any:
        dense = [lp for lp in locals_ if lp.group == "dense"]
        experts = [lp for lp in locals_ if lp.group == "expert"]
        return zero1_shard({"dense": (dense, rank, world), "expert": (experts, edp, 2)})

    return _train(
        _config(),
        EP_TEAM_SHAPES,
        lambda full: _ep_locals(full, ep),
        shard,
        {"dense": None, "expert": expert_groups[ep]},
        {"dense": rank, "expert": edp},
    )


@pytest.fixture(scope="module", params=[2, 4], ids=["dp2", "dp4"])
def data_parallel(request: pytest.FixtureRequest) -> tuple[int, list[dict[str, Any]]]:
    return request.param, run_ranks(request.param, _data_parallel)


@pytest.fixture(scope="module")
def tensor_parallel() -> list[dict[str, Any]]:
    return run_ranks(4, _tensor_parallel)


@pytest.fixture(scope="module")
def expert_parallel() -> list[dict[str, Any]]:
    return run_ranks(4, _expert_parallel)


def _assert_equal_to_reference(results: list[dict[str, Any]]) -> None:
    for rank, result in enumerate(results):
        assert max(result["errors"].values()) <= FP32_TOL, (rank, result["errors"])


def test_teams_of_the_dp_size_beside_owners_equal_single_process_muon(data_parallel) -> None:
    world, results = data_parallel
    teams = results[0]["teams"]["dense"]
    assert {size for _, size, _, _ in teams} == {world}, teams
    assert len(teams) == {2: 2, 4: 3}[world]
    assert results[0]["owners"]["dense"] >= 1
    # Some team matrix is held by several ranks: its blocks cross ZeRO shard boundaries.
    assert any(holders > 1 for _, _, holders, _ in teams), teams
    _assert_equal_to_reference(results)


def test_tp_split_matrices_in_teams_equal_single_process_muon(tensor_parallel) -> None:
    assert any(tp > 1 for _, _, _, tp in tensor_parallel[0]["teams"]["dense"])
    _assert_equal_to_reference(tensor_parallel)


def test_expert_matrices_in_teams_equal_single_process_muon(expert_parallel) -> None:
    assert any(results["teams"]["expert"] for results in expert_parallel)
    _assert_equal_to_reference(expert_parallel)


def test_counted_bytes_collectives_and_flops_equal_the_plan(
    data_parallel, tensor_parallel, expert_parallel
) -> None:
    for result in [*data_parallel[1], *tensor_parallel, *expert_parallel]:
        assert result["exchange"] == result["exchange_planned"]
        assert result["team"] == result["team_planned"]
        assert result["ns_flops"] == result["ns_flops_planned"]
        assert result["ns_calls"] == result["ns_calls_planned"]


def test_every_team_collective_was_issued(data_parallel) -> None:
    """The plans' team traffic is not empty: the equalities above compare real work."""
    for result in data_parallel[1]:
        calls = [c for (op, _), (c, _) in result["team"].items() if op == "team_sum"]
        assert sum(calls) > 0
