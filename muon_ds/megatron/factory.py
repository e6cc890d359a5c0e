"""``get_muon_ds_optimizer``: muon_ds for a Megatron model, in place of Megatron's factory.

It mirrors ``megatron.core.optimizer.get_megatron_optimizer``'s Adam path (same param
groups and overrides, same process groups, one distributed optimizer for dense and one for
expert-parallel parameters, chained), so the training loop, the LR/WD scheduler and logging
see the usual ``ChainedOptimizer``. Megatron's private ``_get_param_groups_and_buffers`` is
reached through ``muon_ds.patches.megatron``, which checks the version.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.optimizer import OptimizerConfig, get_standard_config_overrides
from megatron.core.optimizer.grad_scaler import (
    ConstantGradScaler,
    DynamicGradScaler,
    MegatronGradScaler,
)
from megatron.core.optimizer.optimizer import ChainedOptimizer
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.utils import get_model_config, get_pg_rank

from muon_ds.config import MuonConfig
from muon_ds.device import describe_ns_dtype
from muon_ds.layout import TensorParallel, split_param_group
from muon_ds.megatron.optimizer import MuonDistributedOptimizer
from muon_ds.megatron.views import (
    DENSE,
    DENSE_TP,
    EXPERT,
    EXPERT_TP,
    ModelLayout,
    QkvSplit,
    TpMode,
    megatron_route,
)
from muon_ds.patches import megatron as patches
from muon_ds.plan import NsLedger, experts_planned_first


def grad_scaler(config: OptimizerConfig) -> MegatronGradScaler | None:
    """The loss scaler ``get_megatron_optimizer`` gives each of its optimizers (0.19.2):
    constant for ``--loss-scale``, else dynamic under fp16, else none."""
    if config.loss_scale:
        return ConstantGradScaler(config.loss_scale)
    if config.fp16:
        return DynamicGradScaler(
            initial_scale=config.initial_loss_scale,
            min_scale=config.min_loss_scale,
            growth_factor=2.0,
            backoff_factor=0.5,
            growth_interval=config.loss_scale_window,
            hysteresis=config.hysteresis,
        )
    return None


def split_by_route(
    param_groups: Sequence[dict[str, Any]],
    names: Mapping[torch.nn.Parameter, str],
    config: MuonConfig,
) -> list[dict[str, Any]]:
    """Each Megatron group becomes a Muon and an AdamW group, kept even when empty.

    Megatron aligns param groups across ranks (checkpoints index them), so both halves
    stay on every rank whatever this rank's parameters are.
    """
    # Megatron decays through its own per-group overrides: every half is "decayed" here.
    halves = (("muon", True), ("adamw", True))
    return [
        half
        for group in param_groups
        for half in split_param_group(
            group, lambda p: (megatron_route(names[p], p, config), True), halves, keep_empty=True
        )
    ]


def model_layout(
    model_chunks: Sequence[torch.nn.Module], qkv_split: QkvSplit, tp_mode: TpMode = "whole"
) -> ModelLayout:
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
        tp_mode=tp_mode,
    )


def get_muon_ds_optimizer(
    config: OptimizerConfig,
    model_chunks: Sequence[torch.nn.Module],
    muon_config: MuonConfig,
    *,
    config_overrides: dict | None = None,
    use_gloo_process_groups: bool = True,
    qkv_split: QkvSplit = "qkv",
    tp_mode: TpMode = "whole",
) -> ChainedOptimizer:
    """muon_ds for DDP-wrapped Megatron model chunks, in place of ``get_megatron_optimizer``.

    ``lr`` and ``weight_decay`` come from ``config`` (Megatron's scheduler writes them
    into the param groups every step, with ``wd_mult``/``lr_mult`` overrides); every other
    knob comes from ``muon_config``. ``tp_mode="blockwise"`` makes each TP rank's block of
    a TP-split weight its own matrix (exchanged over the DP group alone), as Megatron's
    blockwise mode does. Exchange groups: ``_expert_exchange_groups`` and below.
    """
    _refuse_unsupported(config)
    if config_overrides is None:
        config_overrides = get_standard_config_overrides(config)
    muon_config = muon_config.replace(lr=config.lr, weight_decay=config.weight_decay)
    groups = ProcessGroupCollection.setup_process_groups_for_optimizer(
        None, model_chunks, use_gloo_process_groups
    )
    data_parallel = groups["intra_dp_cp_group"]
    tensor_and_data = parallel_state.get_tensor_and_data_parallel_group(with_context_parallel=True)
    _check_one_optimizer_instance(data_parallel, tensor_and_data)
    layout = model_layout(model_chunks, qkv_split, tp_mode)
    names = parameter_names(model_chunks)

    ledger = NsLedger()

    def build(is_expert: bool, **args: Any) -> MuonDistributedOptimizer | None:
        # Collective (Megatron aligns the groups over the world): every rank calls it.
        param_groups, buffers = patches.param_groups_and_buffers(
            list(model_chunks), config, config_overrides, is_expert
        )
        if not param_groups:
            return None
        optimizer = MuonDistributedOptimizer(
            split_by_route(param_groups, names, muon_config),
            config,
            muon_config,
            layout=layout,
            names=names,
            ledger=ledger,
            grad_scaler=grad_scaler(config),
            model_chunks=list(model_chunks),
            per_model_buffers=buffers,
            distributed_optimizer_instance_id=0,
            **args,
        )
        optimizer.grad_stats_parallel_group = groups["intra_dist_opt_group"]
        optimizer.tp_group = parallel_state.get_tensor_model_parallel_group()
        optimizer.expert_tp_group = parallel_state.get_expert_tensor_parallel_group()
        return optimizer

    placement = {  # is_expert -> where its matrices are exchanged and its ZeRO shards lie
        False: dict(
            exchange_groups={DENSE: data_parallel, DENSE_TP: tensor_and_data},
            data_parallel_group=data_parallel,
            data_parallel_group_gloo=groups["intra_dp_cp_group_gloo"],
            data_parallel_group_idx=get_pg_rank(groups["mp_group"]),
        ),
        True: dict(
            exchange_groups=_expert_exchange_groups(groups["intra_expt_dp_group"], layout),
            data_parallel_group=groups["intra_expt_dp_group"],
            data_parallel_group_gloo=groups["intra_expt_dp_group_gloo"],
            data_parallel_group_idx=get_pg_rank(groups["expt_tp_pp_with_egtp_remat_group"]),
        ),
    }
    # Each optimizer plans as it is built; the chain keeps Megatron's order, dense first.
    order = (True, False) if experts_planned_first(muon_config.owner_team_max) else (False, True)
    built = {is_expert: build(is_expert, **placement[is_expert]) for is_expert in order}
    optimizers = [o for o in (built[False], built[True]) if o is not None]
    _print_ns_dtype(model_chunks, muon_config)
    return ChainedOptimizer(optimizers)


def _expert_exchange_groups(
    expert_dp: dist.ProcessGroup, layout: ModelLayout
) -> dict[str, dist.ProcessGroup]:
    """Where each kind of matrix is exchanged: every rank holding a piece of it.

    A dense parameter split over TP is one logical matrix held by all DP x TP ranks, so it
    is exchanged over the tensor-and-data-parallel group (with context parallelism, whose
    ranks share the DP shards), which must be one distributed-optimizer instance; a dense
    parameter whole on each TP rank over the DP group (both set by the caller). An expert
    goes over the expert-data-parallel group of its EP rank or, split over expert TP (in
    "whole" mode), over that group times expert TP (``expert_tensor_and_data_group``).
    """
    groups = {EXPERT: expert_dp}
    if layout.local_experts and layout.expert_tp.size > 1 and layout.tp_mode == "whole":
        groups[EXPERT_TP] = expert_tensor_and_data_group(
            parallel_state.get_expert_tensor_parallel_group(), expert_dp
        )
    return groups


def _refuse_unsupported(config: OptimizerConfig) -> None:
    if not config.use_distributed_optimizer:
        raise ValueError("muon_ds needs --use-distributed-optimizer (ZeRO-1 sharded state)")
    if config.overlap_param_gather_with_optimizer_step or config.optimizer_cpu_offload:
        raise NotImplementedError(
            "muon_ds does not support overlap_param_gather_with_optimizer_step or CPU offload"
        )


def _check_one_optimizer_instance(
    data_parallel: dist.ProcessGroup, tensor_and_data: dist.ProcessGroup
) -> None:
    """A TP-split matrix is exchanged over DP x TP, which must be one optimizer instance."""
    tp_size = parallel_state.get_tensor_model_parallel_world_size()
    if tensor_and_data.size() != data_parallel.size() * tp_size:
        raise NotImplementedError(
            f"the tensor-and-data-parallel group has {tensor_and_data.size()} ranks, not DP "
            f"{data_parallel.size()} x TP {tp_size}: muon_ds needs one distributed-optimizer "
            "instance and no GTP weight rematerialisation"
        )


def parameter_names(model_chunks: Sequence[torch.nn.Module]) -> dict[torch.nn.Parameter, str]:
    """Each parameter's name in its chunk, prefixed by the chunk under virtual pipelining."""
    names = {}
    for index, chunk in enumerate(model_chunks):
        for name, param in chunk.named_parameters():
            names[param] = name if len(model_chunks) == 1 else f"chunk{index}.{name}"
    return names


def _print_ns_dtype(model_chunks: Sequence[torch.nn.Module], muon_config: MuonConfig) -> None:
    """Beside the effective-config line the flags printed: what ``ns_dtype="auto"`` became."""
    if dist.get_rank() == 0:
        device = next(p.device for chunk in model_chunks for p in chunk.parameters())
        ns = describe_ns_dtype(muon_config.ns_dtype, device)
        print(f"muon_ds: Newton-Schulz and exchange in {ns}", flush=True)


def expert_tensor_and_data_group(
    expert_tp: dist.ProcessGroup, expert_dp: dist.ProcessGroup
) -> dist.ProcessGroup:
    """Expert TP x expert DP: every rank holding a piece of one TP-split expert matrix.

    Megatron keeps no such group. A rank's is the union of the expert-TP groups of its
    expert-DP peers; every rank learns all of them and creates each once, in the same
    order, as ``new_group`` requires. Collective over the world.
    """
    mine = (dist.get_process_group_ranks(expert_tp), dist.get_process_group_ranks(expert_dp))
    everyone: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, mine)
    unions = sorted(
        {tuple(sorted({r for peer in dp for r in everyone[peer][0]})) for _, dp in everyone}
    )
    created = {ranks: dist.new_group(list(ranks)) for ranks in unions}
    return next(group for ranks, group in created.items() if dist.get_rank() in ranks)
