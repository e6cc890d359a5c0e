"""muon_ds as the inner optimizer of Megatron-core's DistributedOptimizer.

Megatron's ``DistributedOptimizer`` already does everything around the update that a
ZeRO-1 Muon needs and that users rely on: the DDP grad reduce-scatter into each rank's
shard, the fp32 main-param shards, the grad norm and clipping on the *raw* gradients,
found-inf handling, ``step() -> (success, grad_norm, num_zeros)``, the param all-gather
and the checkpoint plumbing. ``MuonDistributedOptimizer`` keeps all of it and swaps only
the inner torch optimizer for ``ShardedMuon``, fed with ``ShardView``s read from the
distributed optimizer's own ranges (``muon_ds.megatron.views``).

``get_muon_ds_optimizer`` mirrors ``megatron.core.optimizer.get_megatron_optimizer``'s
Adam path (same param groups and overrides, same process groups, one distributed
optimizer for dense and one for expert-parallel parameters, chained), so the training
loop, the LR/WD scheduler and logging see the usual ``ChainedOptimizer``. Written
against megatron-core 0.19.2; it uses that version's ``_get_param_groups_and_buffers``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.optimizer import (
    OptimizerConfig,
    _get_param_groups_and_buffers,
    get_standard_config_overrides,
)
from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer
from megatron.core.optimizer.optimizer import ChainedOptimizer
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.utils import get_model_config, get_pg_rank

from muon_ds.config import MuonConfig
from muon_ds.layout import TensorParallel
from muon_ds.math import all_finite
from muon_ds.megatron.views import (
    DENSE,
    DENSE_TP,
    EXPERT,
    ModelLayout,
    QkvSplit,
    megatron_route,
    shard_views,
)
from muon_ds.sharded import ShardedMuon


def init_muon_state(optimizer: ShardedMuon, config: OptimizerConfig | None = None) -> None:
    """Create every shard's state as ``ShardedMuon.step`` would, before any step.

    Megatron calls this before loading a checkpoint into a fresh optimizer, so the
    state tensors exist to be filled (the role Adam's ``init_state_fn`` plays).
    """
    for group in optimizer.param_groups:
        for shard in group["params"]:
            state = optimizer.state[shard]
            if state:
                continue
            if group["algorithm"] == "muon":
                state["momentum_buffer"] = torch.zeros_like(shard, dtype=torch.float32)
            else:
                state["step"] = torch.tensor(0.0, dtype=torch.float32)
                state["exp_avg"] = torch.zeros_like(shard)
                state["exp_avg_sq"] = torch.zeros_like(shard)


class MuonDistributedOptimizer(DistributedOptimizer):
    """Megatron's DistributedOptimizer with ``ShardedMuon`` as the inner optimizer.

    ``param_groups`` are Megatron param groups (model params) each marked with
    ``"algorithm": "muon"`` or ``"adamw"``. Megatron first lays out the shards with a
    plain ``torch.optim.Optimizer`` holding the groups (the same two-phase construction it
    uses for ``HybridDeviceOptimizer``), then ``ShardedMuon`` is built over the resulting
    fp32 main shards; its construction is collective over the world.

    ``exchange_groups`` maps the view group names of ``muon_ds.megatron.views`` to process
    groups: every rank holding a piece of a logical matrix must be in its group.
    """

    def __init__(
        self,
        param_groups: Sequence[dict[str, Any]],
        config: OptimizerConfig,
        muon_config: MuonConfig,
        exchange_groups: Mapping[str, dist.ProcessGroup],
        layout: ModelLayout,
        names: Mapping[torch.nn.Parameter, str],
        **distributed_optimizer_args: Any,
    ) -> None:
        holder = torch.optim.Optimizer(
            list(param_groups), {"lr": config.lr, "weight_decay": config.weight_decay}
        )
        super().__init__(holder, config, None, init_muon_state, **distributed_optimizer_args)
        shard_groups = self.optimizer.param_groups
        self._make_fp32_shards_leaves(shard_groups)
        model_params = [
            [*fp32, *fp16]
            for fp32, fp16 in zip(self.model_fp32_groups, self.model_float16_groups, strict=True)
        ]
        ranges = {}
        for models in model_params:
            for param in models:
                piece = self._get_model_param_range_map(param)["param"]
                ranges[param] = (piece.start, piece.end)
        views = shard_views(shard_groups, model_params, ranges, names, layout)
        # prepare_grads below votes on finiteness across ranks before step() is reached.
        self.optimizer = ShardedMuon(
            shard_groups, views, muon_config, exchange_groups, framework_skips_nonfinite=True
        )

    def _make_fp32_shards_leaves(self, shard_groups: list[dict[str, Any]]) -> None:
        """Replace the shards of fp32 model params by detached views of the same memory.

        Megatron's shard of an fp32 param (e.g. an RMSNorm weight) is a view into the
        param, a non-leaf tensor that ``torch.optim.Optimizer`` refuses. A detached view
        shares the storage, so updates still land in the model param, and is put in both
        lists Megatron reads, so its grad copy and the inner step see the same tensor.
        """
        for group, shards in zip(shard_groups, self.shard_fp32_groups, strict=True):
            for index, shard in enumerate(shards):
                leaf = shard.detach()
                leaf.__dict__.update(shard.__dict__)
                shards[index] = leaf
                group["params"][index] = leaf

    @torch.no_grad()
    def prepare_grads(self) -> bool:
        """Megatron's grad copy, then True (skip) if any rank holds a non-finite grad.

        Without a loss scaler (bf16) Megatron checks nothing; muon_ds skips such steps
        (as ``muon_ds.Muon`` does). Reporting it here, as found-inf, makes the
        ChainedOptimizer skip the dense *and* the expert optimizer together and return
        ``(False, None, None)``, the contract of a skipped fp16 step.
        """
        found_inf = super().prepare_grads()
        grads = [p.grad for g in self.optimizer.param_groups for p in g["params"]]
        finite = all_finite([g for g in grads if g is not None])
        bad = (~finite).to(torch.int32).reshape(1).to(self.buffers[0].grad_data.device)
        dist.all_reduce(bad, op=dist.ReduceOp.MAX)
        return found_inf or bool(bad.item())


def split_by_route(
    param_groups: Sequence[dict[str, Any]],
    names: Mapping[torch.nn.Parameter, str],
    config: MuonConfig,
) -> list[dict[str, Any]]:
    """Each Megatron group becomes a Muon and an AdamW group, kept even when empty.

    Megatron aligns param groups across ranks (checkpoints index them), so both halves
    stay on every rank whatever this rank's parameters are.
    """
    split = []
    for group in param_groups:
        for algorithm in ("muon", "adamw"):
            members = [
                p for p in group["params"] if megatron_route(names[p], p, config) == algorithm
            ]
            split.append({**group, "params": members, "algorithm": algorithm})
    return split


def model_layout(model_chunks: Sequence[torch.nn.Module], qkv_split: QkvSplit) -> ModelLayout:
    """Attention shape, gating and this rank's TP/EP coordinates, from Megatron."""
    config = get_model_config(model_chunks[0])
    experts = config.num_moe_experts or 0
    ep_size = parallel_state.get_expert_model_parallel_world_size()
    return ModelLayout(
        heads=config.num_attention_heads,
        query_groups=config.num_query_groups or config.num_attention_heads,
        head_dim=config.kv_channels,
        gated=config.gated_linear_unit,
        tp=TensorParallel(
            parallel_state.get_tensor_model_parallel_rank(),
            parallel_state.get_tensor_model_parallel_world_size(),
        ),
        expert_tp=TensorParallel(
            parallel_state.get_expert_tensor_parallel_rank(),
            parallel_state.get_expert_tensor_parallel_world_size(),
        ),
        ep_rank=parallel_state.get_expert_model_parallel_rank(),
        local_experts=experts // ep_size,
        qkv_split=qkv_split,
    )


def get_muon_ds_optimizer(
    config: OptimizerConfig,
    model_chunks: Sequence[torch.nn.Module],
    muon_config: MuonConfig,
    *,
    config_overrides: dict | None = None,
    use_gloo_process_groups: bool = True,
    qkv_split: QkvSplit = "qkv",
) -> ChainedOptimizer:
    """muon_ds for DDP-wrapped Megatron model chunks, in place of ``get_megatron_optimizer``.

    ``lr`` and ``weight_decay`` come from ``config`` (Megatron's scheduler writes them
    into the param groups every step, with ``wd_mult``/``lr_mult`` overrides); every other
    knob comes from ``muon_config``. Exchange groups: a dense parameter split over TP is
    one logical matrix held by all DP x TP ranks, so it is exchanged over the
    tensor-and-data-parallel group (with context parallelism, whose ranks share the DP
    shards); a dense parameter whole on each TP rank over the DP group; an expert over the
    expert-data-parallel group of its EP rank. The TP/DP x TP groups must be one
    distributed-optimizer instance (``num_distributed_optimizer_instances == 1``).
    """
    if not config.use_distributed_optimizer:
        raise ValueError("muon_ds needs --use-distributed-optimizer (ZeRO-1 sharded state)")
    if config.fp16 or config.loss_scale:
        raise NotImplementedError("muon_ds on Megatron supports bf16 or fp32 without loss scale")
    if config.overlap_param_gather_with_optimizer_step or config.optimizer_cpu_offload:
        raise NotImplementedError(
            "muon_ds does not support overlap_param_gather_with_optimizer_step or CPU offload"
        )
    if config_overrides is None:
        config_overrides = get_standard_config_overrides(config)
    muon_config = muon_config.replace(lr=config.lr, weight_decay=config.weight_decay)
    groups = ProcessGroupCollection.setup_process_groups_for_optimizer(
        None, model_chunks, use_gloo_process_groups
    )
    data_parallel = groups["intra_dp_cp_group"]
    tensor_and_data = parallel_state.get_tensor_and_data_parallel_group(with_context_parallel=True)
    tp_size = parallel_state.get_tensor_model_parallel_world_size()
    if tensor_and_data.size() != data_parallel.size() * tp_size:
        raise NotImplementedError(
            f"the tensor-and-data-parallel group has {tensor_and_data.size()} ranks, not DP "
            f"{data_parallel.size()} x TP {tp_size}: muon_ds needs one distributed-optimizer "
            "instance and no GTP weight rematerialisation"
        )
    layout = model_layout(model_chunks, qkv_split)
    names = {}
    for index, chunk in enumerate(model_chunks):
        for name, param in chunk.named_parameters():
            names[param] = name if len(model_chunks) == 1 else f"chunk{index}.{name}"

    def build(is_expert: bool, **args: Any) -> MuonDistributedOptimizer | None:
        # Collective (Megatron aligns the groups over the world): every rank calls it.
        param_groups, buffers = _get_param_groups_and_buffers(
            model_chunks,
            model_chunk_offset=0,
            config=config,
            config_overrides=config_overrides,
            filter_fn=lambda g: g["is_expert_parallel"] == is_expert,
            buffer_name="expert_parallel_buffers" if is_expert else "buffers",
        )
        if not param_groups:
            return None
        optimizer = MuonDistributedOptimizer(
            split_by_route(param_groups, names, muon_config),
            config,
            muon_config,
            layout=layout,
            names=names,
            model_chunks=list(model_chunks),
            per_model_buffers=buffers,
            distributed_optimizer_instance_id=0,
            **args,
        )
        optimizer.grad_stats_parallel_group = groups["intra_dist_opt_group"]
        optimizer.tp_group = parallel_state.get_tensor_model_parallel_group()
        optimizer.expert_tp_group = parallel_state.get_expert_tensor_parallel_group()
        return optimizer

    dense = build(
        False,
        exchange_groups={DENSE: data_parallel, DENSE_TP: tensor_and_data},
        data_parallel_group=data_parallel,
        data_parallel_group_gloo=groups["intra_dp_cp_group_gloo"],
        data_parallel_group_idx=get_pg_rank(groups["mp_group"]),
    )
    experts = build(
        True,
        exchange_groups={EXPERT: groups["intra_expt_dp_group"]},
        data_parallel_group=groups["intra_expt_dp_group"],
        data_parallel_group_gloo=groups["intra_expt_dp_group_gloo"],
        data_parallel_group_idx=get_pg_rank(groups["expt_tp_pp_with_egtp_remat_group"]),
    )
    optimizers = [o for o in (dense, experts) if o is not None]
    return ChainedOptimizer(optimizers)
