"""The scale model plans exactly as production does.

The views ``benchmarks.scale_model`` builds for a layout, handed to real
``ShardedMuonCore``s on gloo ranks (a dense and an expert core sharing one ledger, as the
Megatron adapter builds its two optimizers, over process groups of the layout's ranks),
get the owners and the per-rank Newton-Schulz load that ``plan_muon_ds`` reports.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.distributed as dist

from benchmarks import scale_model as sm
from muon_ds.config import MuonConfig
from muon_ds.plan import NsLedger, experts_planned_first
from muon_ds.sharded import ShardedMuonCore
from tests.dist.zero1 import run_ranks
from tests.unit.test_scale_model import TINY_DENSE, TINY_MOE

pytestmark = pytest.mark.dist

CONFIG = MuonConfig(ns_dtype="bfloat16", owner_imbalance_limit=1.0)
"""The tightest balance: each plan leans hardest on the load earlier plans left, so a
different planning order (expert before dense, say) gives other owners."""
TEAMS = MuonConfig(
    ns_dtype="bfloat16", owner_imbalance_limit=1.0, owner_team_max=4, team_flops_per_byte=0.0
)
"""The same with teams (one host: one node, as the scale model's 8-GPU nodes at 4 ranks)."""
DENSE, EXPERT = ("dense", "dense_tp"), ("expert",)
"""The exchange groups of each Megatron optimizer."""


def _production_plans(
    rank: int, world: int, model: sm.Model, layout: sm.Layout, config: MuonConfig
) -> Any:
    groups = sm.build_groups(model, layout)
    process_groups = {}
    for group in sorted(groups, key=lambda g: g.name):
        for ranks in sorted(group.replicas):  # new_group: every rank, the same order
            created = dist.new_group(list(ranks))
            if rank in ranks:
                process_groups[group.name] = created
    ledger = NsLedger()
    owners = {}
    # In the order the adapter builds them (muon_ds.megatron.factory).
    experts_first = experts_planned_first(config.owner_team_max)
    for names in (EXPERT, DENSE) if experts_first else (DENSE, EXPERT):
        mine = [g for g in groups if g.name in names]
        if not mine:
            continue
        views = [
            view
            for g in mine
            for copy, ranks in enumerate(g.replicas)
            if rank in ranks
            for view in g.views[copy][ranks.index(rank)]
        ]
        buffer = torch.zeros(max((v.offset + v.numel for v in views), default=0))
        core = ShardedMuonCore(
            [buffer],
            ["muon"],
            views,
            config,
            {g.name: process_groups[g.name] for g in mine},
            ledger=ledger,
        )
        for name, plan in core.plans.items():
            owners[name] = [(m.owner, m.team) for m in plan.matrices]
    return owners, ledger.of(range(world))


@pytest.mark.parametrize("config", [CONFIG, TEAMS], ids=["owners", "teams"])
@pytest.mark.parametrize(
    ("model", "layout"),
    [(TINY_DENSE, sm.Layout(4, tp=2)), (TINY_MOE, sm.Layout(4, ep=2))],
    ids=["dense-dp2xtp2", "moe-dp4-ep2"],
)
def test_scale_model_owners_teams_and_load_are_productions(
    model: sm.Model, layout: sm.Layout, config: MuonConfig
) -> None:
    groups = sm.build_groups(model, layout)
    plans, load = sm.plan_muon_ds(groups, config, 2)
    if config is TEAMS:
        assert any(m.team for g in groups for p in plans[g.name] for m in p.matrices)
    results = run_ranks(layout.gpus, _production_plans, model, layout, config)
    for rank, (owners, production_load) in enumerate(results):
        assert production_load == load
        expected = {
            g.name: [(m.owner, m.team) for m in plans[g.name][copy].matrices]
            for g in groups
            for copy, ranks in enumerate(g.replicas)
            if rank in ranks
        }
        assert owners == expected
