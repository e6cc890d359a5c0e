"""The owner-team planner's guarantees, on random layouts (pure: no ranks, no torch.distributed).

Every element of every matrix reaches exactly one place (its owner's staging buffer or one
member's block, at the position its logical row and column say) and comes back to exactly
where it was; team FLOPs add up to the iteration's; the balance limit holds whenever every
matrix could be split over the node; and without a node to share, nothing changes.
"""

from __future__ import annotations

import random

import pytest
import torch

from benchmarks.scale_model.layouts import LocalParam, zero1_views
from muon_ds.layout import NOT_SPLIT, TensorParallel
from muon_ds.math.newton_schulz import newton_schulz_flops
from muon_ds.math.team_newton_schulz import team_member_flops
from muon_ds.matrices import MatrixPlan
from muon_ds.plan import Plan, TeamOptions, build_plan
from muon_ds.teams import TeamShape

STEPS = 5


def _layout(seed: int) -> tuple[dict[str, tuple[int, int, int | None]], int, int]:
    """Random matrices (rows, cols, TP dim or None), a TP size and a DP size."""
    rng = random.Random(seed)
    tp, dp = rng.choice([(1, 2), (1, 3), (1, 4), (2, 2), (2, 3)])
    shapes = {}
    for i in range(rng.randint(2, 5)):
        rows, cols = rng.choice([8, 12, 24, 40]), rng.choice([8, 16, 24, 56])
        tp_dim = rng.choice([None, 0, 1]) if tp > 1 else None
        shapes[f"w{i}"] = (rows, cols, tp_dim)
    return shapes, tp, dp


def _plan(
    shapes: dict[str, tuple[int, int, int | None]], tp: int, dp: int, **teams: object
) -> Plan:
    """Group rank t + tp * d holds DP shard d of TP rank t's flat buffer (as the scale model)."""
    by_tp = []
    for t in range(tp):
        params = []
        for name, (rows, cols, tp_dim) in shapes.items():
            if tp_dim is None:
                # Replicated params would need their own group: make them TP-split by rows.
                tp_dim = 0
            local = (rows // tp, cols) if tp_dim == 0 else (rows, cols // tp)
            split = TensorParallel(t, tp, tp_dim) if tp > 1 else NOT_SPLIT
            params.append(LocalParam(name, local, split, (), "dense"))
        by_tp.append(zero1_views(params, dp))
    views = [by_tp[t][d] for d in range(dp) for t in range(tp)]
    options = TeamOptions(**{"max_size": tp * dp, "nodes": (0,) * (tp * dp), **teams})
    return build_plan(
        views,
        ns_steps=STEPS,
        imbalance_limit=1.1,
        bucket_bytes=2**20,
        wire_bytes=2,
        teams=options,
    )


def _local_tensors(matrix: MatrixPlan, full: torch.Tensor) -> list[torch.Tensor]:
    """Each TP rank's flat local tensor of ``full`` (the logical matrix)."""
    if matrix.tp_size == 1:
        return [full.reshape(-1)]
    if matrix.tp_dim == 0:
        return [part.reshape(-1) for part in full.chunk(matrix.tp_size, dim=0)]
    return [part.reshape(-1) for part in full.chunk(matrix.tp_size, dim=1)]


def _staging_of(matrix: MatrixPlan, member: int, full: torch.Tensor) -> torch.Tensor:
    """What ``member`` must hold: its band of ``full`` (team) or the staging order (owner)."""
    if matrix.team is None:
        if matrix.tp_dim == 1 and matrix.tp_size > 1:
            return torch.cat([p.reshape(-1) for p in full.chunk(matrix.tp_size, dim=1)])
        return full.reshape(-1)
    j = matrix.team.members.index(member)
    a, b = matrix.team.cuts[j], matrix.team.cuts[j + 1]
    band = full[a:b] if TeamShape.of(matrix).long_rows else full[:, a:b]
    return band.reshape(-1)


def _rect(flat: torch.Tensor, start: int, rows: int, width: int, stride: int) -> torch.Tensor:
    return flat[start : start + (rows - 1) * stride + width].as_strided((rows, width), (stride, 1))


@pytest.mark.parametrize("seed", range(40))
def test_segments_carry_every_element_to_one_place_and_back(seed: int) -> None:
    shapes, tp, dp = _layout(seed)
    plan = _plan(shapes, tp, dp, flops_per_byte=0.0)
    for matrix in plan.matrices:
        full = torch.arange(matrix.numel, dtype=torch.float64).reshape(matrix.rows, matrix.cols)
        locals_ = _local_tensors(matrix, full)
        staged = {r: torch.full_like(_staging_of(matrix, r, full), -1.0) for r in matrix.ranks}
        hits = {r: torch.zeros_like(staged[r]) for r in matrix.ranks}
        returned = [torch.full_like(t, -1.0) for t in locals_]
        for s in matrix.segments:
            source = _rect(locals_[s.tp_rank], s.lo, s.rows, s.width, s.holder_stride)
            _rect(staged[s.member], s.staging, s.rows, s.width, s.staging_stride).copy_(source)
            _rect(hits[s.member], s.staging, s.rows, s.width, s.staging_stride).add_(1)
            back = _rect(staged[s.member], s.staging, s.rows, s.width, s.staging_stride)
            _rect(returned[s.tp_rank], s.lo, s.rows, s.width, s.holder_stride).copy_(back)
        for rank in matrix.ranks:
            assert torch.equal(hits[rank], torch.ones_like(hits[rank])), (matrix.name, rank)
            assert torch.equal(staged[rank], _staging_of(matrix, rank, full)), (matrix.name, rank)
        held = {(p.tp_rank, e) for p in matrix.pieces for e in range(p.lo, p.hi)}
        for t, local in enumerate(locals_):
            mine = torch.tensor([(t, e) in held for e in range(local.numel())])
            assert torch.equal(returned[t][mine], local[mine]), matrix.name


@pytest.mark.parametrize("seed", range(40))
def test_teams_hold_the_balance_limit_when_every_matrix_can_split_over_the_node(
    seed: int,
) -> None:
    """One node, team traffic free: some assignment within the limit always exists."""
    shapes, tp, dp = _layout(seed)
    plan = _plan(shapes, tp, dp, flops_per_byte=0.0)
    assert any(m.team for m in plan.matrices) or plan.imbalance() <= 1.1
    assert plan.imbalance() <= 1.1, [(m.name, m.flops, m.ranks) for m in plan.matrices]


@pytest.mark.parametrize("seed", range(20))
def test_team_flops_add_up_to_the_iteration(seed: int) -> None:
    """Split: the members' FLOPs sum to one whole-matrix iteration exactly; replicated:
    plus ``2 m^3`` per step for every member but one."""
    shapes, tp, dp = _layout(seed)
    plan = _plan(shapes, tp, dp, flops_per_byte=0.0)
    for m in plan.matrices:
        if m.team is None:
            continue
        total = sum(m.team.member_flops)
        whole = newton_schulz_flops(m.rows, m.cols, STEPS)
        extra = 0 if m.team.mode == "split" else STEPS * 2 * min(m.rows, m.cols) ** 3
        assert total == whole + extra * (m.team.size - 1)
        assert plan.ns_flops(m.team.members[0]) >= m.team.member_flops[0]


def test_team_member_flops_follow_the_block_and_the_rows_of_b() -> None:
    m, width = 6, 10
    assert team_member_flops(m, width, 2, 5, "split") == 5 * (4 * 36 * 10 + 2 * 2 * 36)
    assert team_member_flops(m, width, 2, 5, "replicated") == 5 * (4 * 36 * 10 + 2 * 216)


def test_without_a_shared_node_or_with_teams_off_every_matrix_has_one_owner() -> None:
    shapes = {"big": (40, 56, None), "small": (8, 8, None)}
    teamed = _plan(shapes, 1, 4, flops_per_byte=0.0)
    assert any(m.team for m in teamed.matrices)
    apart = _plan(shapes, 1, 4, flops_per_byte=0.0, nodes=(0, 1, 2, 3))
    off = _plan(shapes, 1, 4, flops_per_byte=0.0, max_size=1)
    for plan in (apart, off):
        assert not any(m.team for m in plan.matrices)
        assert [m.owner for m in plan.matrices] == [m.owner for m in off.matrices]


def test_team_traffic_is_one_norm_and_one_gram_sum_per_step_and_a_gather_when_split() -> None:
    plan = _plan({"big": (40, 56, None), "small": (8, 8, None)}, 1, 4, flops_per_byte=0.0)
    (team,) = [m.team for m in plan.matrices if m.team]
    m = 40
    for rank in team.members:
        calls_and_bytes = plan.team_traffic(rank)
        assert calls_and_bytes["team_sum"] == (STEPS + 1, 4 + STEPS * m * (m + 1) // 2 * 2)
        chunk = -(-m // team.size) * m * 2
        gathers = (STEPS, STEPS * chunk) if team.mode == "split" else (0, 0)
        assert calls_and_bytes["team_gather"] == gathers


def test_teams_stay_inside_one_node() -> None:
    shapes = {"big": (40, 56, None), "tall": (56, 24, None), "small": (8, 8, None)}
    nodes = (0, 0, 1, 1)
    plan = _plan(shapes, 1, 4, flops_per_byte=0.0, nodes=nodes)
    teams = [m.team for m in plan.matrices if m.team]
    assert teams
    for team in teams:
        assert len({nodes[r] for r in team.members}) == 1
