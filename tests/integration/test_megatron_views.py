"""How the Megatron adapter describes parameters to the core (one process, no Megatron run).

Parameters are plain tensors carrying the attributes Megatron sets (``tensor_model_parallel``,
``partition_dim``, ``partition_stride``, ``allreduce``, ``is_embedding_or_output_parameter``),
so every layout rule is checked without starting ranks.
"""

from __future__ import annotations

import pytest
import torch

from muon_ds import MuonConfig
from muon_ds.layout import NOT_SPLIT, RowBlock, TensorParallel
from muon_ds.megatron.views import (
    DENSE,
    DENSE_TP,
    EXPERT,
    EXPERT_TP,
    ModelLayout,
    global_name,
    megatron_route,
    shard_views,
)

HEADS, GROUPS, HEAD_DIM, HIDDEN = 4, 2, 8, 16
QKV = "decoder.layers.0.self_attention.linear_qkv.weight"
FC1 = "decoder.layers.0.mlp.linear_fc1.weight"


def _layout(tp: int = 2, qkv_split: str = "qkv", tp_rank: int = 1) -> ModelLayout:
    return ModelLayout(
        heads=HEADS,
        query_groups=GROUPS,
        head_dim=HEAD_DIM,
        gated=True,
        tp=TensorParallel(tp_rank, tp),
        expert_tp=TensorParallel(0, 1),
        ep_rank=1,
        local_experts=3,
        qkv_split=qkv_split,
    )


def _param(shape: tuple[int, ...], **attrs: object) -> torch.nn.Parameter:
    param = torch.nn.Parameter(torch.zeros(shape))
    for key, value in attrs.items():
        setattr(param, key, value)
    return param


def _views(named: dict[str, torch.nn.Parameter], layout: ModelLayout):
    params = list(named.values())
    groups = [{"params": params, "algorithm": "muon"}]
    ranges = {p: (0, p.numel()) for p in params}
    names = {p: n for n, p in named.items()}
    return {v.name: v for v in shard_views(groups, [params], ranges, names, layout)}


def _column(rows: int, stride: int = 1) -> torch.nn.Parameter:
    return _param(
        (rows, HIDDEN), tensor_model_parallel=True, partition_dim=0, partition_stride=stride
    )


def test_qkv_is_split_per_query_group_into_q_k_v() -> None:
    rows = (GROUPS // 2) * (HEADS // GROUPS + 2) * HEAD_DIM  # one group per TP rank
    view = _views({QKV: _column(rows)}, _layout())[QKV]
    q_rows = HEADS // GROUPS * HEAD_DIM
    assert view.blocks == (
        RowBlock(0, 0, q_rows),
        RowBlock(1, q_rows, q_rows + HEAD_DIM),
        RowBlock(2, q_rows + HEAD_DIM, rows),
    )
    assert (view.tp, view.group) == (TensorParallel(1, 2, 0), DENSE_TP)


def test_qkv_per_head_keys_are_global_heads_and_none_keeps_it_whole() -> None:
    rows = (GROUPS // 2) * (HEADS // GROUPS + 2) * HEAD_DIM
    per_head = _views({QKV: _column(rows)}, _layout(qkv_split="per_head"))[QKV]
    # TP rank 1 holds heads 4..7 of the 8 (q, q, k, v per group).
    assert [b.key for b in per_head.blocks] == [4, 5, 6, 7]
    assert _views({QKV: _column(rows)}, _layout(qkv_split="none"))[QKV].blocks == ()


def test_blockwise_tp_mode_keeps_each_tp_ranks_blocks_to_itself() -> None:
    """``--muon-tp-mode blockwise``: no TP split in the view, so no exchange over TP; QKV
    still cut per local query group, the row-parallel proj one matrix per TP rank."""
    layout = ModelLayout(**{**_layout().__dict__, "tp_mode": "blockwise"})
    rows = (GROUPS // 2) * (HEADS // GROUPS + 2) * HEAD_DIM
    proj = "decoder.layers.0.self_attention.linear_proj.weight"
    row_parallel = _param((HIDDEN, HIDDEN // 2), tensor_model_parallel=True, partition_dim=1)
    views = _views({QKV: _column(rows), proj: row_parallel}, layout)
    q_rows = HEADS // GROUPS * HEAD_DIM
    assert views[QKV].blocks == (
        RowBlock(0, 0, q_rows),
        RowBlock(1, q_rows, q_rows + HEAD_DIM),
        RowBlock(2, q_rows + HEAD_DIM, rows),
    )
    for view in views.values():
        assert (view.tp, view.group) == (NOT_SPLIT, DENSE)


def test_query_groups_that_do_not_divide_over_tp_are_refused() -> None:
    with pytest.raises(NotImplementedError, match="query groups do not divide"):
        _views({QKV: _column(48)}, _layout(tp=4))


def test_gated_fc1_is_gate_and_up_and_its_stride_two_is_accepted() -> None:
    view = _views({FC1: _column(32, stride=2)}, _layout())[FC1]
    assert view.blocks == (RowBlock(0, 0, 16), RowBlock(1, 16, 32))


def test_an_unknown_tp_stride_is_refused() -> None:
    with pytest.raises(NotImplementedError, match="partition_stride 3"):
        _views({"decoder.layers.0.mlp.linear_fc2.weight": _column(32, stride=3)}, _layout())


def test_exchange_group_follows_tp_split_and_expert_parallelism() -> None:
    expert = "decoder.layers.0.mlp.experts.local_experts.2.linear_fc2.weight"
    views = _views(
        {
            "decoder.layers.0.mlp.router.weight": _param((6, HIDDEN)),
            "decoder.layers.0.self_attention.linear_proj.weight": _param(
                (HIDDEN, HIDDEN), tensor_model_parallel=True, partition_dim=1
            ),
            expert: _param(
                (HIDDEN, 8), tensor_model_parallel=True, partition_dim=1, allreduce=False
            ),
        },
        _layout(),
    )
    assert views["decoder.layers.0.mlp.router.weight"].group == DENSE
    assert views["decoder.layers.0.mlp.router.weight"].tp == NOT_SPLIT
    assert views["decoder.layers.0.self_attention.linear_proj.weight"].group == DENSE_TP
    # EP rank 1 with 3 local experts: local expert 2 is global expert 5; expert TP is 1.
    renamed = views["decoder.layers.0.mlp.experts.5.linear_fc2.weight"]
    assert (renamed.group, renamed.tp) == (EXPERT, NOT_SPLIT)
    assert global_name(expert, _layout()) == renamed.name


def test_te_grouped_experts_are_one_matrix_each_with_gate_and_up_apart() -> None:
    """TEGroupedMLP's ``weight{i}`` names the same matrices SequentialMLP does."""
    fc1 = "decoder.layers.0.mlp.experts.linear_fc1.weight2"
    fc2 = "decoder.layers.0.mlp.experts.linear_fc2.weight0"
    views = _views(
        {fc1: _param((16, HIDDEN), allreduce=False), fc2: _param((HIDDEN, 8), allreduce=False)},
        _layout(),
    )
    # EP rank 1 with 3 local experts: local experts 2 and 0 are global experts 5 and 3.
    gated = views["decoder.layers.0.mlp.experts.5.linear_fc1.weight"]
    assert gated.blocks == (RowBlock(0, 0, 8), RowBlock(1, 8, 16))
    assert gated.group == EXPERT
    assert views["decoder.layers.0.mlp.experts.3.linear_fc2.weight"].blocks == ()


def test_te_single_grouped_3d_weights_are_one_matrix_per_global_expert() -> None:
    """``moe_single_grouped_weight``: ``[experts, rows, cols]``, expert i is ``weight[i]``."""
    fc1 = "decoder.layers.0.mlp.experts.linear_fc1.weight"
    fc2 = "decoder.layers.0.mlp.experts.linear_fc2.weight"
    # The attributes TE's grouped linears get at expert TP 1 (column and row parallel).
    views = _views(
        {
            fc1: _param(
                (3, 16, HIDDEN), allreduce=False, tensor_model_parallel=True, partition_dim=0
            ),
            fc2: _param(
                (3, HIDDEN, 8), allreduce=False, tensor_model_parallel=True, partition_dim=1
            ),
        },
        _layout(),
    )
    # EP rank 1 with 3 local experts holds global experts 3, 4, 5: gate 2e, up 2e + 1.
    assert views[fc1].matrix_shape == (48, HIDDEN)
    assert views[fc1].blocks == (
        RowBlock(6, 0, 8),
        RowBlock(7, 8, 16),
        RowBlock(8, 16, 24),
        RowBlock(9, 24, 32),
        RowBlock(10, 32, 40),
        RowBlock(11, 40, 48),
    )
    assert views[fc2].matrix_shape == (3 * HIDDEN, 8)
    assert views[fc2].blocks == tuple(
        RowBlock(3 + e, e * HIDDEN, (e + 1) * HIDDEN) for e in range(3)
    )
    assert {views[fc1].group, views[fc2].group} == {EXPERT}
    assert views[fc1].tp == views[fc2].tp == NOT_SPLIT


def test_a_3d_grouped_weight_of_another_expert_count_is_refused() -> None:
    fc2 = "decoder.layers.0.mlp.experts.linear_fc2.weight"
    with pytest.raises(NotImplementedError, match="holds 2 experts but this EP rank has 3"):
        _views({fc2: _param((2, HIDDEN, 8), allreduce=False)}, _layout())


def test_weights_whose_matrices_cannot_be_cut_out_are_refused() -> None:
    legacy = {"decoder.layers.0.mlp.experts.weight1": _param((HIDDEN, 48), allreduce=False)}
    with pytest.raises(NotImplementedError, match="legacy GroupedMLP"):
        _views(legacy, _layout())
    grouped_3d = {"decoder.layers.0.mlp.experts.fc1": _param((3, 16, HIDDEN), allreduce=False)}
    with pytest.raises(NotImplementedError, match=r"3-D weight \(3, 16, 16\).*route it to AdamW"):
        _views(grouped_3d, _layout())


def test_experts_split_over_expert_tp_are_exchanged_over_expert_tp_and_dp() -> None:
    layout = ModelLayout(**{**_layout().__dict__, "expert_tp": TensorParallel(1, 2)})
    expert = _param((HIDDEN, 8), tensor_model_parallel=True, partition_dim=1, allreduce=False)
    name = "decoder.layers.0.mlp.experts.local_experts.0.linear_fc2.weight"
    view = _views({name: expert}, layout)["decoder.layers.0.mlp.experts.3.linear_fc2.weight"]
    assert (view.group, view.tp) == (EXPERT_TP, TensorParallel(1, 2, 1))


def test_3d_grouped_weights_with_expert_tensor_parallelism_are_refused() -> None:
    layout = ModelLayout(**{**_layout().__dict__, "expert_tp": TensorParallel(0, 2)})
    fc2 = _param((3, HIDDEN, 4), tensor_model_parallel=True, partition_dim=1, allreduce=False)
    with pytest.raises(NotImplementedError, match="expert tensor parallelism"):
        _views({"decoder.layers.0.mlp.experts.linear_fc2.weight": fc2}, layout)


def test_routing_megatron_tag_moonlight_rule_and_router_by_config() -> None:
    config = MuonConfig()
    head = _param((32, HIDDEN), is_embedding_or_output_parameter=True)
    assert megatron_route("lm.head_weight", head, config) == "adamw"
    assert megatron_route("final_layernorm.weight", _param((HIDDEN,)), config) == "adamw"
    router = _param((6, HIDDEN))
    assert megatron_route("mlp.router.weight", router, config) == "muon"
    by_config = MuonConfig(adamw_patterns=("*router*",))
    assert megatron_route("mlp.router.weight", router, by_config) == "adamw"


def test_init_state_creates_exactly_the_state_a_step_creates() -> None:
    """Megatron fills this state when loading a checkpoint into a fresh optimizer."""
    from muon_ds.layout import ShardView
    from muon_ds.megatron.checkpoint import init_muon_state
    from muon_ds.sharded import ShardedMuon

    def build() -> ShardedMuon:
        groups = [
            {"params": [torch.zeros(24)], "algorithm": "muon"},
            {"params": [torch.zeros(5)], "algorithm": "adamw"},
        ]
        view = ShardView(name="w", matrix_shape=(4, 6), start=0, end=24, buffer=0, offset=0)
        return ShardedMuon(groups, [view], MuonConfig())

    def layout(optimizer: ShardedMuon) -> list:
        return [
            {k: (tuple(v.shape), v.dtype) for k, v in optimizer.state[p].items()}
            for g in optimizer.param_groups
            for p in g["params"]
        ]

    stepped, initialised = build(), build()
    for group in stepped.param_groups:
        for p in group["params"]:
            p.grad = torch.ones_like(p)
    stepped.step()
    init_muon_state(initialised)
    assert layout(initialised) == layout(stepped)
    assert all(t.count_nonzero() == 0 for s in initialised.state.values() for t in s.values())
