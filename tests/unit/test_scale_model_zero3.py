"""The scale model's per-parameter shardings: DeepSpeed ZeRO-3 and PyTorch FSDP2.

Each parameter is sharded on its own, so every matrix spans the DP ranks and travels to
its owner and back; the matrices, and so the Newton-Schulz work, stay the same.
"""

from __future__ import annotations

import dataclasses
import sys
from collections import defaultdict

import pytest

from benchmarks import scale_model as sm
from muon_ds.config import MuonConfig
from muon_ds.layout import NOT_SPLIT, ShardView
from tests.unit.test_scale_model import IDS, LAYOUTS, RATES, _holdings

CONFIG = MuonConfig()
PER_PARAM = ("zero3", "fsdp2")


def _local(name: str, rows: int, cols: int) -> sm.LocalParam:
    return sm.LocalParam(name, (rows, cols), NOT_SPLIT, (), "dense")


def _ranges(views: list[list[ShardView]]) -> list[list[tuple[str, int, int, int]]]:
    return [[(v.name, v.start, v.end, v.offset) for v in rank] for rank in views]


def _copies(layout: sm.Layout, model: sm.Model):
    """Every distinct copy of every group: its name and its group ranks' views."""
    for g in sm.build_groups(model, layout):
        for views in g.views[: 1 if g.copies else None]:
            yield g.name, views


def _pieces(views) -> dict[tuple[str, int], list[tuple[int, int, int]]]:
    """Per TP-local matrix (name, TP rank): its (start, end, group rank) ranges, sorted."""
    found: dict[tuple[str, int], list[tuple[int, int, int]]] = defaultdict(list)
    for rank, rank_views in enumerate(views):
        for v in rank_views:
            found[(v.name, v.tp.rank)].append((v.start, v.end, rank))
    return {key: sorted(ranges) for key, ranges in found.items()}


def test_zero3_gives_each_rank_its_padded_flat_range_of_every_param():
    # 6 elements over 4 ranks: 2 each, rank 3 all padding; 5 elements: 2, 2, 1, padding.
    views = sm.zero3_views([_local("a", 2, 3), _local("b", 1, 5)], 4)
    assert _ranges(views) == [
        [("a", 0, 2, 0), ("b", 0, 2, 2)],
        [("a", 2, 4, 0), ("b", 2, 4, 2)],
        [("a", 4, 6, 0), ("b", 4, 5, 2)],
        [],  # only padding: no view
    ]


def test_fsdp2_gives_each_rank_its_chunk_of_whole_rows_of_every_param():
    # 5 rows of 2 over 4 ranks: 2, 2, 1 rows, rank 3 none; 2 rows of 3: 1, 1, none, none.
    views = sm.fsdp2_views([_local("a", 5, 2), _local("b", 2, 3)], 4)
    assert _ranges(views) == [
        [("a", 0, 4, 0), ("b", 0, 3, 4)],
        [("a", 4, 8, 0), ("b", 3, 6, 4)],
        [("a", 8, 10, 0)],
        [],
    ]


@pytest.mark.parametrize("sharding", sm.SHARDINGS)
@pytest.mark.parametrize(("model", "layout"), LAYOUTS, ids=IDS)
def test_views_cover_every_element_of_every_matrix_once_per_copy(model, layout, sharding):
    layout = dataclasses.replace(layout, sharding=sharding)
    covered = []
    for name, views in _copies(layout, model):
        for key, ranges in _pieces(views).items():
            shape = next(v.matrix_shape for rank in views for v in rank if v.name == key[0])
            numel = shape[0] * shape[1]
            # Sorted ranges that start at 0, meet end to end and stop at numel: each
            # element exactly once.
            assert [start for start, _, _ in ranges] == [0] + [end for _, end, _ in ranges[:-1]]
            assert ranges[-1][1] == numel
            assert all(start < end for start, end, _ in ranges)
            if sharding == "fsdp2":  # whole rows only
                assert all(start % shape[1] == 0 for start, _, _ in ranges)
            covered.append((name, key))
    expected = []
    for p in sm.transformer_params(model):
        if p.muon:
            local = sm.local_param(p, model, layout.tp, 0)
            expected += [(local.group, (p.name, t)) for t in range(local.tp.size)]
    assert sorted(covered) == sorted(expected)  # every matrix in exactly one copy


@pytest.mark.parametrize(("model", "layout"), LAYOUTS, ids=IDS)
def test_under_zero3_every_matrix_of_at_least_w_elements_spans_all_w_ranks(model, layout):
    layout = dataclasses.replace(layout, sharding="zero3")
    for name, views in _copies(layout, model):
        world = layout.expert_dp if name == "expert" else layout.dp
        tp = len(views) // world  # "dense_tp": group rank t + tp * d is TP rank t, DP rank d
        for key, ranges in _pieces(views).items():
            numel = ranges[-1][1]
            per_rank = -(-numel // world)
            assert [(start, rank) for start, _, rank in ranges] == [
                (d * per_rank, key[1] + tp * d) for d in range(len(ranges))
            ]
            if numel >= world:
                assert len(ranges) == world, key


def _planned(model: sm.Model, layout: sm.Layout):
    groups = sm.build_groups(model, layout)
    plans, ledger = sm.plan_muon_ds(groups, CONFIG, 2)
    matrices = sorted(
        (m.name, m.key, m.rows, m.cols, m.flops)
        for g in groups
        for plan in plans[g.name][: 1 if g.copies else None]
        for m in plan.matrices
    )
    sent = sum(
        plan.bytes_sent(r, 2) for g in groups for plan in plans[g.name] for r in range(plan.world)
    )
    return matrices, sum(ledger), sent


@pytest.mark.parametrize(("model", "layout"), LAYOUTS, ids=IDS)
def test_shardings_plan_the_same_newton_schulz_work_but_move_different_bytes(model, layout):
    zero1 = _planned(model, layout)
    for sharding in PER_PARAM:
        matrices, flops, sent = _planned(model, dataclasses.replace(layout, sharding=sharding))
        assert matrices == zero1[0]
        assert flops == zero1[1]
        assert sent > zero1[2]  # every matrix now spans the DP group


@pytest.mark.parametrize("sharding", PER_PARAM)
def test_each_matrix_travels_to_its_owner_and_back_but_for_the_owners_own_piece(sharding):
    model, layout = LAYOUTS[0][0], sm.Layout(4, sharding=sharding)
    (group,) = sm.build_groups(model, layout)
    (plan,) = sm.plan_muon_ds([group], CONFIG, 2)[0][group.name]
    held = _holdings(group.views[0], model, layout)
    expected = sum(
        2 * 2 * (sum(held[m.name, m.key].values()) - held[m.name, m.key].get(m.owner, 0))
        for m in plan.matrices
    )
    assert sum(sm.muon_ds_cost(plan, 2).flows.values()) == expected
    row = sm.model_layout(model, layout, RATES, CONFIG)
    assert row["schemes"]["muon_ds"]["total_bytes_sent"] == expected
    assert row["schemes"]["muon_ds"]["ns_redundancy"] == 1.0


def test_adamw_elements_are_the_flat_partition_under_zero_and_real_rows_under_fsdp2():
    params = [_local("embedding", 5, 2), _local("norm", 1, 5)]
    assert sm.adamw_elements(params, 4, "zero1") == [4] * 4  # 15 elements, padded to 16
    assert sm.adamw_elements(params, 4, "zero3") == [3 + 2] * 4  # each padded: 12 and 8
    assert sm.adamw_elements(params, 4, "fsdp2") == [4 + 5, 4, 2, 0]


def test_the_layout_label_and_row_name_the_sharding():
    model, layout = LAYOUTS[2][0], sm.Layout(4, ep=2, sharding="fsdp2")
    assert layout.label() == "DP4xTP1, EP2 (EDP2), FSDP2"
    assert sm.Layout(8, tp=2).label() == "DP4xTP2, ZeRO-1"
    row = sm.model_layout(model, layout, RATES, CONFIG)
    assert (row["layout"], row["sharding"]) == (layout.label(), "fsdp2")


def test_an_unknown_sharding_is_refused_naming_the_allowed_ones(monkeypatch, capsys):
    with pytest.raises(ValueError, match=r"sharding 'zero2' is not one of zero1, zero3, fsdp2"):
        sm.Layout(4, sharding="zero2")
    monkeypatch.setattr(sys, "argv", ["scale_model", "--sharding", "zero2"])
    with pytest.raises(SystemExit):
        sm.main()
    error = capsys.readouterr().err
    assert "--sharding: invalid choice: 'zero2'" in error
    assert all(name in error for name in sm.SHARDINGS)
