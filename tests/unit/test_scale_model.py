"""The scale model's counts: muon_ds's are the plan's, the peers' follow their layouts."""

from __future__ import annotations

from collections import defaultdict

import pytest

from benchmarks import scale_model as sm
from benchmarks.shapes import ModelShape
from muon_ds.config import MuonConfig
from muon_ds.math import newton_schulz_flops
from muon_ds.plan import build_plan
from muon_ds.teams import ring_bytes

TINY_DENSE = sm.Model(
    "tiny-dense",
    "GQA, gated MLP",
    ModelShape("tiny-dense", 3, 64, 4, 2, 96, 128, seq=8, micro_batch=1),
)
TINY_MOE = sm.Model(
    "tiny-moe",
    "MLA, first layer dense, 4 routed experts + 1 shared",
    ModelShape(
        "tiny-moe",
        3,
        64,
        4,
        4,
        96,
        128,
        seq=8,
        micro_batch=1,
        experts=4,
        expert_ffn=48,
        top_k=2,
        shared_experts=1,
        first_dense_layers=1,
    ),
    sm.MLA(kv_lora_rank=32, qk_head_dim=16, rope_head_dim=8, v_head_dim=16),
)
CONFIG = MuonConfig()
TEAMS = MuonConfig(owner_team_max=8, team_flops_per_byte=0.0, owner_imbalance_limit=1.0)
"""Teams on, their traffic weighed at nothing and the balance tightest, so the tiny models
form teams."""
RATES = sm.Rates()
LAYOUTS = [
    (TINY_DENSE, sm.Layout(4)),
    (TINY_DENSE, sm.Layout(8, tp=2)),
    (TINY_MOE, sm.Layout(4, ep=2)),
    (TINY_MOE, sm.Layout(8, tp=2, ep=2)),
]
IDS = ["dense-dp4", "dense-dp4xtp2", "moe-dp4-ep2", "moe-dp4xtp2-ep2"]


def _logical_matrices(model: sm.Model) -> list[tuple[str, int, int]]:
    """Every logical Muon matrix of the model, counted from its shape alone."""
    s = model.shape
    found = []
    for p in sm.transformer_params(model):
        if not p.muon:
            continue
        rows, cols = p.shape
        if p.fused == "gated":
            found += [(p.name, rows // 2, cols)] * 2
        elif p.fused == "qkv":
            found.append((p.name, s.heads * s.head_dim, cols))
            found += [(p.name, s.query_groups * s.head_dim, cols)] * 2
        else:
            found.append((p.name, rows, cols))
    return found


def _plans(model: sm.Model, layout: sm.Layout, config: MuonConfig = CONFIG):
    groups = sm.build_groups(model, layout)
    return groups, sm.plan_muon_ds(groups, config, 2)[0]


@pytest.mark.parametrize("config", [CONFIG, TEAMS], ids=["owners", "teams"])
@pytest.mark.parametrize(("model", "layout"), LAYOUTS, ids=IDS)
def test_muon_ds_counts_are_the_plans_own(model, layout, config):
    groups, plans = _plans(model, layout, config)
    for g in groups:
        for plan in plans[g.name]:
            cost = sm.muon_ds_cost(plan, 2)
            sent = [0] * plan.world
            for (src, _), nbytes in cost.flows.items():
                sent[src] += nbytes
            assert sent == [plan.bytes_sent(r, 2) for r in range(plan.world)]
            assert cost.ns_flops == [plan.ns_flops(r) for r in range(plan.world)]
            everything = range(len(plan.matrices))
            assert cost.ns_calls == [
                plan.ns_matrices(r) + len(plan.teamed(r, everything)) for r in range(plan.world)
            ]
            # A team's collectives: a ring over its members, each sending its ring bytes.
            team_sent = [0.0] * plan.world
            for (src, _), nbytes in cost.team_flows.items():
                team_sent[src] += nbytes
            assert team_sent == [
                sum(ring_bytes(m.team) for m in plan.matrices if m.team and r in m.ranks)
                for r in range(plan.world)
            ]
            assert cost.team_calls == [
                sum(calls for calls, _ in plan.team_traffic(r).values()) for r in range(plan.world)
            ]
    if config is TEAMS:
        assert any(m.team for g in groups for plan in plans[g.name] for m in plan.matrices)
    # Over all groups and copies the plans hold each logical matrix of the model once
    # (TP copies of a replicated matrix count once: they are the same matrix).
    planned = sorted(
        (m.name, m.rows, m.cols)
        for g in groups
        for plan in plans[g.name][: 1 if g.copies else None]
        for m in plan.matrices
    )
    assert planned == sorted(_logical_matrices(model))


@pytest.mark.parametrize(("model", "layout"), LAYOUTS, ids=IDS)
def test_muon_ds_runs_newton_schulz_once_per_matrix(model, layout):
    row = sm.model_layout(model, layout, RATES, CONFIG)
    muon_ds = row["schemes"]["muon_ds"]
    replicated = [
        p for p in sm.transformer_params(model) if p.muon and p.tp_dim is None and p.expert is None
    ]
    if layout.tp == 1 or not replicated:
        assert muon_ds["ns_redundancy"] == 1.0
        assert muon_ds["ns_call_redundancy"] == 1.0
    else:  # whole-on-every-TP-rank matrices are orthogonalised by each TP rank's DP group
        assert muon_ds["ns_redundancy"] > 1.0
    total = sum(newton_schulz_flops(r, c, CONFIG.ns_steps) for _, r, c in _logical_matrices(model))
    extra = sum(
        newton_schulz_flops(*p.shape, CONFIG.ns_steps) * (layout.tp - 1) for p in replicated
    )
    assert muon_ds["ns_redundancy"] == pytest.approx((total + extra) / total, rel=1e-12)


@pytest.mark.parametrize("config", [CONFIG, TEAMS], ids=["owners", "teams"])
@pytest.mark.parametrize(("model", "layout"), LAYOUTS, ids=IDS)
def test_no_scheme_beats_the_floor_of_each_matrix_once_spread_evenly(model, layout, config):
    """The floor is each logical matrix's FLOPs once over every rank (plus the mean
    elementwise update, nearly free at this memory speed), and every scheme's slowest
    rank takes at least that, at these rates and at the stated ones."""
    fast_memory = sm.Rates(hbm_tbps=1e12)
    ns_rate = fast_memory.ns_efficiency * fast_memory.peak_tflops * 1e12
    total = sum(newton_schulz_flops(r, c, config.ns_steps) for _, r, c in _logical_matrices(model))
    for rates in (fast_memory, RATES):
        for scheme in sm.model_layout(model, layout, rates, config)["schemes"].values():
            assert scheme["floor_ms"] <= scheme["optimizer_ms"]
            assert scheme["floor_share"] <= scheme["share"]
            if rates is fast_memory:
                assert scheme["floor_ms"] == pytest.approx(
                    1e3 * total / layout.gpus / ns_rate, rel=1e-9
                )


def _holdings(views, model: sm.Model, layout: sm.Layout):
    """Brute force over elements: how many elements of each logical matrix each rank holds."""
    held: dict[tuple[str, int], dict[int, int]] = defaultdict(lambda: defaultdict(int))
    for rank, rank_views in enumerate(views):
        for v in rank_views:
            cols = v.matrix_shape[1]
            for element in range(v.start, v.end):
                row = element // cols
                key = next(b.key for b in v.matrix_blocks() if b.start <= row < b.end)
                held[(v.name, key)][rank] += 1
    return held


@pytest.mark.parametrize("sharding", sm.SHARDINGS)
def test_algorithm1_gathers_every_straddling_matrix_to_every_holder(sharding):
    model, layout = TINY_DENSE, sm.Layout(4, sharding=sharding)
    (group,), plans = _plans(model, layout)
    (plan,) = plans[group.name]
    cost = sm.algorithm1_cost(plan, 1, 2)
    held = _holdings(group.views[0], model, layout)
    flops = {(m.name, m.key): m.flops for m in plan.matrices}
    received = [0] * plan.world
    ns = [0] * plan.world
    for matrix, holders in held.items():
        numel = sum(holders.values())
        for rank, mine in holders.items():
            received[rank] += 2 * (numel - mine)
            ns[rank] += flops[matrix]
    got = [0] * plan.world
    for (_, dst), nbytes in cost.flows.items():
        got[dst] += nbytes
    assert got == received
    sent = [0] * plan.world  # each holder's piece to every other holder of the matrix
    for (src, _), nbytes in cost.flows.items():
        sent[src] += nbytes
    assert sent == [
        sum(2 * h[rank] * (len(h) - 1) for h in held.values() if rank in h)
        for rank in range(plan.world)
    ]
    assert cost.ns_flops == ns
    assert any(len(h) > 1 for h in held.values())  # the shards do cut matrices
    row = sm.model_layout(model, layout, RATES, CONFIG)
    assert row["schemes"]["moonlight_alg1"]["ns_redundancy"] > 1.0
    assert row["schemes"]["muon_ds"]["ns_redundancy"] == 1.0


def test_algorithm1_adds_a_tp_gather_of_the_other_tp_ranks_parts():
    model, layout = TINY_DENSE, sm.Layout(2, tp=2)  # DP=1: only the TP gather moves
    (plan,) = _plans(model, layout)[1]["dense_tp"]
    cost = sm.algorithm1_cost(plan, 2, 2)
    local = sum(m.numel // 2 for m in plan.matrices)
    assert dict(cost.flows) == {(0, 1): 2 * local, (1, 0): 2 * local}
    assert cost.ns_flops == [sum(m.flops for m in plan.matrices)] * 2


def test_megatron_layout_keeps_every_param_whole_moves_nothing_and_pads():
    model, layout = TINY_DENSE, sm.Layout(4)
    plans = [copies[0] for copies in _plans(model, layout)[1].values()]
    order = [p.name for p in sm.transformer_params(model)]
    params = sm.whole_params(plans, order)
    placed = sm.megatron_layout(params, layout.dp)
    assert sorted(placed.shard_of) == sorted(p.name for p in params)
    assert sum(placed.loads) == sum(p.numel for p in params)
    assert placed.shard_size >= max(placed.loads) >= max(p.numel for p in params)
    assert placed.shard_size % sm.MEGATRON_ALIGN == 0
    assert placed.padding == layout.dp * placed.shard_size - sum(p.numel for p in params) > 0
    cost = sm.megatron_cost(params, placed, 1, 2)
    assert not cost.flows
    for d in range(layout.dp):
        assert cost.ns_flops[d] == sum(p.flops for p in params if placed.shard_of[p.name] == d)
    megatron = sm.model_layout(model, layout, RATES, CONFIG)["schemes"]["megatron_whole"]
    assert megatron["total_bytes_sent"] == 0
    assert megatron["ns_redundancy"] == 1.0
    assert megatron["padding"] == pytest.approx(placed.padding / sum(p.numel for p in params))


def test_megatron_duplicated_mode_gathers_over_tp_and_repeats_newton_schulz_tp_times():
    model, layout = TINY_DENSE, sm.Layout(8, tp=2)
    row = sm.model_layout(model, layout, RATES, CONFIG)
    megatron = row["schemes"]["megatron_whole"]
    assert megatron["ns_redundancy"] == 2.0  # every dense matrix of this model is TP-split
    (plan,) = _plans(model, layout)[1]["dense_tp"]
    tp_local = sum(m.numel // 2 for m in plan.matrices)
    assert megatron["total_bytes_sent"] == 2 * tp_local * (layout.tp - 1) * layout.tp
    params = sm.whole_params([plan], [p.name for p in sm.transformer_params(model)])
    placed = sm.megatron_layout(params, layout.dp)
    cost = sm.megatron_cost(params, placed, layout.tp, 2)
    for d in range(layout.dp):
        mine = sum(p.flops for p in params if placed.shard_of[p.name] == d)
        assert [cost.ns_flops[t + layout.tp * d] for t in range(layout.tp)] == [mine] * layout.tp


def test_megatron_layout_packs_largest_first_at_64_aligned_starts():
    sizes = [("a", 65), ("b", 128), ("c", 1)]
    placed = sm.megatron_layout([sm.WholeParam(n, k, False, 0, 1) for n, k in sizes], 2)
    # b to shard 0, then a and c to shard 1, c starting at 128 (65 rounded up to 64s).
    assert placed.shard_of == {"b": 0, "a": 1, "c": 1}
    assert placed.loads == [128, 66]
    assert placed.shard_size == 192  # max cursor 129 rounded to lcm(64, lcm(2, 128) / 2)
    assert placed.padding == 2 * 192 - 194


def test_bytes_inside_a_node_move_at_nvlink_speed_and_between_nodes_at_ib_speed():
    rates = sm.Rates(nvlink_gbps=400.0, ib_gbps=40.0)
    world = 2 * rates.gpus_per_node
    flows = {(0, 1): 8e9, (0, rates.gpus_per_node): 2e9, (1, 0): 1e9}
    cost = sm.GlobalCost(dict(flows), [0] * world, [0] * world, [(0, 0)] * world)
    result = sm.evaluate(cost, rates, compute_s=1.0, logical_flops=1, logical_calls=1)
    # Rank 0 sends 8 GB over NVLink (receives 1) and 2 GB over IB: 20 ms + 50 ms.
    assert result.exchange_ms == pytest.approx(20.0 + 50.0)
    assert result.max_inter_node_bytes_sent == 2e9
    assert result.max_bytes_sent == 10e9


def _plan_alone(views, prior_flops=None):
    return build_plan(
        views,
        ns_steps=CONFIG.ns_steps,
        imbalance_limit=CONFIG.owner_imbalance_limit,
        bucket_bytes=int(CONFIG.exchange_bucket_mb * 2**20),
        wire_bytes=2,
        prior_flops=prior_flops,
    )


MOE_LAYOUTS = [sm.Layout(4, ep=2), sm.Layout(8, tp=2, ep=2), sm.Layout(16, ep=2)]
MOE_IDS = ["dp4-ep2", "dp4xtp2-ep2", "dp16-ep2"]


@pytest.mark.parametrize("layout", MOE_LAYOUTS, ids=MOE_IDS)
def test_muon_ds_plans_each_copy_against_the_flops_its_ranks_own_in_earlier_plans(layout):
    """As muon_ds's Megatron adapter without teams: the dense core plans "dense" then
    "dense_tp", then the expert core "expert"; copies in ascending global ranks; one
    ledger throughout."""
    groups = {g.name: g for g in sm.build_groups(TINY_MOE, layout)}
    plans, ledger = sm.plan_muon_ds(list(groups.values()), CONFIG, 2)
    owned = [0] * layout.gpus
    priors_differ = False
    for name in [n for n in ("dense", "dense_tp", "expert") if n in groups]:
        group = groups[name]
        assert list(group.replicas) == sorted(group.replicas)
        priors = [[owned[r] for r in ranks] for ranks in group.replicas]
        for k, ranks in enumerate(group.replicas):
            prior = [owned[r] for r in ranks]
            assert plans[name][k] == _plan_alone(group.views[k], prior)
            for i, r in enumerate(ranks):
                owned[r] += plans[name][k].ns_flops(i)
        priors_differ |= name == "expert" and priors[0] != priors[1]
    assert priors_differ  # the EP copies do meet different dense loads
    assert ledger == owned
    # The scheme's per-rank Newton-Schulz FLOPs are the ledger's.
    muon_ds = sm.model_layout(TINY_MOE, layout, RATES, CONFIG)["schemes"]["muon_ds"]
    assert muon_ds["max_ns_tflop"] == max(owned) / 1e12
    assert muon_ds["ns_imbalance"] == max(owned) / (sum(owned) / layout.gpus)


@pytest.mark.parametrize(
    ("layout", "strictly_better"),
    list(zip(MOE_LAYOUTS, (False, True, True), strict=True)),
    ids=MOE_IDS,
)
def test_muon_ds_balance_over_all_groups_is_no_worse_than_balancing_each_group_alone(
    layout, strictly_better
):
    groups = sm.build_groups(TINY_MOE, layout)
    ledger = sm.plan_muon_ds(groups, CONFIG, 2)[1]
    alone = [0] * layout.gpus
    for g in groups:
        for views, ranks in zip(g.views, g.replicas, strict=True):
            plan = _plan_alone(views)
            for i, r in enumerate(ranks):
                alone[r] += plan.ns_flops(i)
    assert sum(ledger) == sum(alone)  # the same matrices, only their owners moved

    def worst(loads):
        return max(loads) / (sum(loads) / len(loads))

    assert worst(ledger) <= worst(alone)
    if strictly_better:  # group by group, some rank's experts land on its big dense share
        assert worst(ledger) < worst(alone)


def test_the_slowest_rank_sets_optimizer_time_by_the_stated_rates():
    model, layout = TINY_MOE, sm.Layout(8, tp=2, ep=2)
    fast_links = sm.Rates(nvlink_gbps=1e12, ib_gbps=1e12, hbm_tbps=1e12)
    row = sm.model_layout(model, layout, fast_links, CONFIG)
    ns_rate = fast_links.ns_efficiency * fast_links.peak_tflops * 1e12
    specs = sm.transformer_params(model)
    compute = (
        6
        * sm.active_params(model, specs)
        * (fast_links.global_batch * fast_links.seq_len / layout.gpus)
        / (fast_links.mfu * fast_links.peak_tflops * 1e12)
    )
    assert row["compute_s"] == pytest.approx(compute, rel=1e-12)
    for scheme in row["schemes"].values():
        assert scheme["optimizer_ms"] == pytest.approx(
            1e3 * scheme["max_ns_tflop"] * 1e12 / ns_rate, rel=1e-6
        )
        t = scheme["optimizer_ms"] / 1e3
        assert scheme["share"] == pytest.approx(t / (row["compute_s"] + t), rel=1e-12)


def test_full_size_shapes_have_the_published_parameter_counts():
    counts = {k: sum(p.numel for p in sm.transformer_params(m)) for k, m in sm.MODELS.items()}
    assert counts["llama3-8b"] == 8_030_261_248
    assert counts["llama-70b"] == 70_553_706_496
    assert 15.5e9 < counts["moonlight-16b"] < 16.5e9
    active = sm.active_params(
        sm.MODELS["moonlight-16b"], sm.transformer_params(sm.MODELS["moonlight-16b"])
    )
    assert 2.4e9 < active < 3.2e9  # "A3B": about 3B activated


@pytest.mark.parametrize(
    ("model", "layout", "message"),
    [
        (TINY_DENSE, sm.Layout(6, tp=3), r"tp=3 must divide gpus and gpus_per_node=8"),
        (TINY_MOE, sm.Layout(6, ep=3), r"ep=3 must divide the 4 routed experts"),
        (TINY_DENSE, sm.Layout(4, ep=2), r"ep=2 must divide the 0 routed experts"),
        (TINY_DENSE, sm.Layout(16, tp=8), r"tp=8 must divide heads=4"),
    ],
)
def test_layouts_the_shards_cannot_describe_are_refused_by_name(model, layout, message):
    with pytest.raises(ValueError, match=message):
        sm.model_layout(model, layout, RATES, CONFIG)


@pytest.mark.parametrize(
    ("rates", "message"),
    [
        ({"mfu": 0.0}, r"mfu=0.0 is not allowed: it must be > 0"),
        ({"ns_efficiency": 1.5}, r"ns_efficiency=1.5 is a fraction of peak: \(0, 1\]"),
        ({"ib_gbps": -1.0}, r"ib_gbps=-1.0 is not allowed"),
    ],
)
def test_rates_outside_their_range_are_refused_by_name(rates, message):
    with pytest.raises(ValueError, match=message):
        sm.Rates(**rates)
