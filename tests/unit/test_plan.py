"""Planner guarantees, checked over random shapes, layouts and shard boundaries."""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from muon_ds.layout import RowBlock, ShardView, TensorParallel, expert_blocks
from muon_ds.math import newton_schulz_flops
from muon_ds.math.gram_newton_schulz import ns_flops
from muon_ds.plan import NsLedger, PlanError, build_plan, plan_groups
from muon_ds.staging import stage, unstage
from muon_ds.testing.zero1 import even_split


@st.composite
def sharded_params(draw: st.DrawFn):
    """Random params of one exchange group: TP size, blocks, DP cut points anywhere."""
    tp_size = draw(st.sampled_from([1, 2]))
    dp_size = draw(st.integers(1, 4))
    specs = []
    for i in range(draw(st.integers(1, 5))):
        experts = draw(st.sampled_from([1, 2, 3]))
        rows = experts * draw(st.integers(1, 5))
        cols = draw(st.integers(1, 9))
        tp_dim = draw(st.sampled_from([0, 1]))
        specs.append((f"p{i}", rows, cols, experts, tp_dim))
    total = sum(rows * cols for _, rows, cols, _, _ in specs)
    views_by_rank: list[list[ShardView]] = [[] for _ in range(dp_size * tp_size)]
    for t in range(tp_size):
        cuts = sorted(
            draw(st.lists(st.integers(0, total), min_size=dp_size - 1, max_size=dp_size - 1))
        )
        bounds = [0, *cuts, total]
        position = 0
        for name, rows, cols, experts, tp_dim in specs:
            blocks = expert_blocks(rows, experts) if experts > 1 else ()
            for d in range(dp_size):
                lo, hi = max(bounds[d], position), min(bounds[d + 1], position + rows * cols)
                if lo < hi:
                    views_by_rank[d * tp_size + t].append(
                        ShardView(
                            name,
                            (rows, cols),
                            lo - position,
                            hi - position,
                            0,
                            lo - bounds[d],
                            tp=TensorParallel(t, tp_size, tp_dim),
                            blocks=blocks,
                        )
                    )
            position += rows * cols
    return views_by_rank


def _plan(views_by_rank, bucket_bytes: int = 64, imbalance_limit: float = 1.1):
    return build_plan(
        views_by_rank,
        ns_steps=5,
        imbalance_limit=imbalance_limit,
        bucket_bytes=bucket_bytes,
        wire_bytes=2,
    )


@settings(max_examples=150, deadline=None)
@given(sharded_params(), st.integers(1, 200))
def test_every_element_reaches_one_owner_and_returns_to_its_holder(views_by_rank, bucket_bytes):
    plan = _plan(views_by_rank, bucket_bytes)
    # Each matrix's pieces tile its staging buffer exactly once.
    for matrix in plan.matrices:
        covered = 0
        for piece in sorted(matrix.pieces, key=lambda p: p.staging):
            assert piece.staging == covered
            covered += piece.numel
        assert covered == matrix.numel
    # Each piece lies inside its holder's view; all pieces of a TP-local tensor tile it once.
    elements: Counter = Counter()
    for matrix in plan.matrices:
        for piece in matrix.pieces:
            view = next(
                v
                for v in views_by_rank[piece.holder]
                if v.name == matrix.name and v.tp.rank == piece.tp_rank
            )
            assert view.start <= piece.lo < piece.hi <= view.end
            for element in range(piece.lo, piece.hi):
                elements[(matrix.name, piece.tp_rank, element)] += 1
    expected = {
        (v.name, v.tp.rank, e)
        for views in views_by_rank
        for v in views
        for e in range(v.start, v.end)
    }
    assert set(elements) == expected
    assert set(elements.values()) == {1}


@settings(max_examples=150, deadline=None)
@given(sharded_params(), st.integers(1, 200))
def test_wire_messages_agree_and_predicted_bytes_equal_a_brute_force_count(
    views_by_rank, bucket_bytes
):
    plan = _plan(views_by_rank, bucket_bytes)
    world = len(views_by_rank)
    bucketed = [i for bucket in plan.buckets for i in bucket]
    assert sorted(bucketed + list(plan.local)) == list(range(len(plan.matrices)))
    assert len(set(bucketed)) == len(bucketed)
    sent = [0] * world
    for b in range(len(plan.buckets)):
        transfers = [plan.gather(r, b) for r in range(world)]
        for src in range(world):
            for dst in range(world):
                # What src sends dst in the gather is what dst expects from src, in order.
                assert transfers[src].send[dst] == transfers[dst].recv[src]
            assert transfers[src].send[src] == ()
            sent[src] += sum(transfers[src].send_counts()) + sum(transfers[src].recv_counts())
    assert [plan.bytes_sent(r, 2) for r in range(world)] == [2 * s for s in sent]
    # Brute force over elements: every element not held by its matrix's owner goes and returns.
    brute = [0] * world
    for matrix in plan.matrices:
        for piece in matrix.pieces:
            if piece.holder != matrix.owner:
                brute[piece.holder] += 2 * piece.numel
                brute[matrix.owner] += 2 * piece.numel
    assert [plan.bytes_sent(r, 2) for r in range(world)] == brute


@settings(max_examples=100, deadline=None)
@given(sharded_params())
def test_staging_places_each_local_element_at_its_logical_position(views_by_rank):
    """Assembling pieces through the staging buffer rebuilds the true logical matrix."""
    plan = _plan(views_by_rank)
    shapes = {v.name: v for views in views_by_rank for v in views}
    for matrix in plan.matrices:
        view = shapes[matrix.name]
        rows, cols = view.matrix_shape
        locals_ = [
            torch.arange(rows * cols, dtype=torch.float64).reshape(rows, cols) + 1000 * t
            for t in range(matrix.tp_size)
        ]
        staging = torch.full((matrix.numel,), float("nan"), dtype=torch.float64)
        for piece in matrix.pieces:
            values = locals_[piece.tp_rank].reshape(-1)[piece.lo : piece.hi]
            staging[piece.staging : piece.staging + piece.numel] = values
        assembled = stage(matrix, staging)
        blocks = view.matrix_blocks()
        mine = [
            torch.cat([local[b.start : b.end] for b in blocks if b.key == matrix.key])
            for local in locals_
        ]
        expected = torch.cat(mine, dim=1 if matrix.tp_dim == 1 else 0)
        assert torch.equal(assembled, expected)
        assert torch.equal(unstage(matrix, assembled), staging)


def test_a_matrix_wholly_inside_one_shard_is_local_and_moves_nothing():
    views = [
        [ShardView("a", (4, 8), 0, 32, 0, 0), ShardView("b", (4, 8), 0, 8, 0, 32)],
        [ShardView("b", (4, 8), 8, 32, 0, 0), ShardView("c", (4, 8), 0, 32, 0, 24)],
    ]
    plan = _plan(views, imbalance_limit=1e9)
    by_name = {m.name: m for m in plan.matrices}
    assert by_name["a"].is_local
    assert by_name["a"].owner == 0
    assert by_name["c"].is_local
    assert by_name["c"].owner == 1
    assert by_name["b"].owner == 1  # it holds 24 of b's 32 elements
    # Only b's 8 elements on rank 0 move: rank 0 sends them (bf16), rank 1 sends them back.
    assert [plan.bytes_sent(r, 2) for r in range(2)] == [8 * 2, 8 * 2]


def _zero1_views(shapes: list[tuple[str, int, int]], world: int) -> list[list[ShardView]]:
    split = even_split([r * c for _, r, c in shapes], world)
    return [
        [
            ShardView(shapes[s.param][0], shapes[s.param][1:], s.start, s.end, 0, s.offset)
            for s in rank
        ]
        for rank in split
    ]


DENSE_GPT = [
    (f"l{i}.{n}", r, c)
    for i in range(16)
    for n, r, c in [
        ("q", 2048, 2048),
        ("k", 512, 2048),
        ("v", 512, 2048),
        ("o", 2048, 2048),
        ("gate", 5632, 2048),
        ("up", 5632, 2048),
        ("down", 2048, 5632),
    ]
]
"""A Llama-like dense GPT: 16 layers, hidden 2048, GQA 4:1, SwiGLU 5632."""

MOE_LAYER = [("attn.q", 2048, 2048), ("attn.kv", 1024, 2048), ("attn.o", 2048, 2048)] + [
    (f"expert{e}.{n}", r, c)
    for e in range(64)
    for n, r, c in [("gate", 1408, 2048), ("up", 1408, 2048), ("down", 2048, 1408)]
]
"""A Moonlight / DeepSeek-V3-small-like MoE layer with 64 experts."""


@pytest.mark.parametrize("world", [2, 4, 8])
@pytest.mark.parametrize("shapes", [DENSE_GPT, MOE_LAYER], ids=["dense_gpt", "moe_64_experts"])
def test_newton_schulz_flops_are_balanced_across_ranks(shapes, world):
    plan = _plan(_zero1_views(shapes, world), bucket_bytes=2**26)
    assert plan.imbalance() <= 1.10
    assert sum(plan.ns_flops(r) for r in range(world)) == sum(
        newton_schulz_flops(r, c, 5) for _, r, c in shapes
    )


def test_views_that_overlap_or_leave_gaps_are_rejected_with_the_elements_named():
    overlap = [[ShardView("w", (4, 4), 0, 10, 0, 0)], [ShardView("w", (4, 4), 8, 16, 0, 0)]]
    with pytest.raises(PlanError, match=r"'w'.*rank 1's range \[8, 16\) overlaps element 10"):
        _plan(overlap)
    gap = [[ShardView("w", (4, 4), 0, 10, 0, 0)], [ShardView("w", (4, 4), 12, 16, 0, 0)]]
    with pytest.raises(PlanError, match=r"leaves a gap before element 10"):
        _plan(gap)
    short = [[ShardView("w", (4, 4), 0, 10, 0, 0)], []]
    with pytest.raises(PlanError, match=r"elements \[10, 16\) are held by no rank"):
        _plan(short)


def test_ranks_that_disagree_on_a_parameter_shape_are_rejected():
    views = [[ShardView("w", (4, 4), 0, 8, 0, 0)], [ShardView("w", (8, 2), 8, 16, 0, 0)]]
    with pytest.raises(PlanError, match=r"'w': rank 1 describes it as matrix_shape=\(8, 2\)"):
        _plan(views)


def test_blocks_that_do_not_cover_every_row_are_rejected():
    blocks = (RowBlock(0, 0, 2), RowBlock(1, 3, 4))
    views = [[ShardView("w", (4, 4), 0, 16, 0, 0, blocks=blocks)]]
    with pytest.raises(PlanError, match=r"must cover rows \[0, 4\) once"):
        _plan(views)


def test_owners_balance_the_flops_a_rank_already_owns_in_other_groups():
    """An MoE rank's Newton-Schulz time is its dense plus its expert matrices: planned
    after the dense group, the experts go where the dense load is light."""
    world = 4
    dense = _plan(_zero1_views(DENSE_GPT[:4], world), bucket_bytes=2**26)  # attention
    prior = [dense.ns_flops(r) for r in range(world)]
    experts = _zero1_views(MOE_LAYER[3:27], world)  # 8 experts
    alone = _plan(experts, bucket_bytes=2**26)
    joint = build_plan(
        experts,
        ns_steps=5,
        imbalance_limit=1.1,
        bucket_bytes=2**26,
        wire_bytes=2,
        prior_flops=prior,
    )

    def worst(plan):
        totals = [prior[r] + plan.ns_flops(r) for r in range(world)]
        return max(totals) / (sum(totals) / world)

    assert sum(map(joint.ns_flops, range(world))) == sum(map(alone.ns_flops, range(world)))
    assert worst(alone) > 1.1  # balanced group by group, the sum is not
    assert worst(joint) <= 1.1


def test_prior_flops_must_name_every_rank_of_the_group():
    with pytest.raises(PlanError, match=r"prior_flops=\[0\] must hold one count >= 0 per rank"):
        build_plan(
            _zero1_views([("w", 8, 8)], 2),
            ns_steps=5,
            imbalance_limit=1.1,
            bucket_bytes=64,
            wire_bytes=2,
            prior_flops=[0],
        )


def test_planning_several_groups_charges_one_ledger_as_planning_each_by_hand():
    """``plan_groups`` plans each group against what earlier groups gave each global rank,
    in a fixed order, so every core of one model balances each rank's total."""
    dense = _zero1_views(DENSE_GPT[:4], 4)
    experts = {(0, 2): _zero1_views(MOE_LAYER[3:15], 2), (1, 3): _zero1_views(MOE_LAYER[15:27], 2)}
    knobs = {"ns_steps": 5, "imbalance_limit": 1.1, "bucket_bytes": 2**26, "wire_bytes": 2}
    ledger = NsLedger()
    plans = plan_groups({"dense": {(0, 1, 2, 3): dense}, "expert": experts}, ledger, **knobs)

    by_hand: dict[int, int] = {}
    for name, ranks, views in [
        ("dense", (0, 1, 2, 3), dense),
        *[("expert", r, v) for r, v in experts.items()],
    ]:
        plan = build_plan(views, prior_flops=[by_hand.get(r, 0) for r in ranks], **knobs)
        assert [m.owner for m in plans[name, ranks].matrices] == [m.owner for m in plan.matrices]
        for group_rank, rank in enumerate(ranks):
            by_hand[rank] = by_hand.get(rank, 0) + plan.ns_flops(group_rank)
    assert ledger.flops == by_hand
    assert list(plans) == [("dense", (0, 1, 2, 3)), ("expert", (0, 2)), ("expert", (1, 3))]


def test_a_group_that_cannot_be_planned_is_named_with_its_ranks():
    views = _zero1_views([("w", 8, 8)], 2)
    views[1] = views[1][:0]  # rank 1 drops its part: the matrix has a gap
    with pytest.raises(PlanError, match=r"group 'dense' \(ranks \[4, 5\]\)"):
        plan_groups(
            {"dense": {(4, 5): views}},
            NsLedger(),
            ns_steps=5,
            imbalance_limit=1.1,
            bucket_bytes=64,
            wire_bytes=2,
        )


@pytest.mark.parametrize("algorithm", ["standard", "gram", "auto"])
def test_each_matrix_counts_the_flops_of_the_algorithm_that_runs_it(algorithm: str) -> None:
    """The planner balances and predicts what ``orthogonalize`` will run: Gram where
    ``ns_algorithm`` takes it for the shape ("auto": the 1:2 KV projection, not the square
    attention matrices or the 1:1.45 experts)."""
    views = _zero1_views(MOE_LAYER[:9], 4)
    plan = build_plan(
        views,
        ns_steps=5,
        imbalance_limit=1.1,
        bucket_bytes=2**26,
        wire_bytes=2,
        ns_algorithm=algorithm,
    )
    expected = sum(ns_flops(r, c, 5, algorithm) for _, r, c in MOE_LAYER[:9])
    assert sum(plan.ns_flops(rank) for rank in range(4)) == expected
    if algorithm == "auto":
        assert expected < sum(newton_schulz_flops(r, c, 5) for _, r, c in MOE_LAYER[:9])
