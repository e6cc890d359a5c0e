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
against megatron-core 0.19; what it needs of Megatron's internals (the private
``_get_param_groups_and_buffers``, the ``DistributedOptimizer`` methods overridden here,
DDP's bucket groups) goes through ``muon_ds.patches.megatron``, which checks the version.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.dist_checkpointing.dict_utils import nested_values
from megatron.core.dist_checkpointing.mapping import ShardedStateDict, ShardedTensorFactory
from megatron.core.dist_checkpointing.utils import extract_sharded_tensors_and_factories
from megatron.core.optimizer import OptimizerConfig, get_standard_config_overrides
from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer
from megatron.core.optimizer.grad_scaler import (
    ConstantGradScaler,
    DynamicGradScaler,
    MegatronGradScaler,
)
from megatron.core.optimizer.optimizer import ChainedOptimizer, param_group_identifier_keys
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.utils import get_model_config, get_pg_rank

from muon_ds.config import MuonConfig
from muon_ds.device import describe_ns_dtype
from muon_ds.layout import TensorParallel
from muon_ds.math import adamw_state, all_finite
from muon_ds.megatron.views import (
    DENSE,
    DENSE_TP,
    EXPERT,
    EXPERT_TP,
    ModelLayout,
    QkvSplit,
    TpMode,
    megatron_route,
    shard_views,
)
from muon_ds.patches import megatron as patches
from muon_ds.routing import RoutedTensor, RoutingReport, print_on_rank0, routing_mismatch
from muon_ds.sharded import MOMENTUM, ShardedMuon


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
                state[MOMENTUM] = torch.zeros_like(shard, dtype=torch.float32)
            else:
                state.update(adamw_state(shard))


class MuonDistributedOptimizer(DistributedOptimizer):
    """Megatron's DistributedOptimizer with ``ShardedMuon`` as the inner optimizer.

    ``param_groups`` are Megatron param groups (model params) each marked with
    ``"algorithm": "muon"`` or ``"adamw"``. Megatron first lays out the shards with a
    plain ``torch.optim.Optimizer`` holding the groups (the same two-phase construction it
    uses for ``HybridDeviceOptimizer``), then ``ShardedMuon`` is built over the resulting
    fp32 main shards; its construction is collective over the world.

    ``exchange_groups`` maps the view group names of ``muon_ds.megatron.views`` to process
    groups: every rank holding a piece of a logical matrix must be in its group.
    ``ns_load`` is shared by the dense and the expert optimizer of one model, so each
    rank's Newton-Schulz FLOPs are balanced over both (``ShardedMuonCore``).
    """

    def __init__(
        self,
        param_groups: Sequence[dict[str, Any]],
        config: OptimizerConfig,
        muon_config: MuonConfig,
        exchange_groups: Mapping[str, dist.ProcessGroup],
        layout: ModelLayout,
        names: Mapping[torch.nn.Parameter, str],
        ns_load: dict[int, int],
        grad_scaler: MegatronGradScaler | None = None,
        **distributed_optimizer_args: Any,
    ) -> None:
        patches.check_distributed_optimizer(DistributedOptimizer)
        # Every model param of this optimizer, not only this rank's (checkpoints list all),
        # taken before Megatron puts the shards into these same group dicts.
        muon_params = {
            p: names[p]
            for group in param_groups
            if group["algorithm"] == "muon"
            for p in group["params"]
        }
        holder = torch.optim.Optimizer(
            list(param_groups), {"lr": config.lr, "weight_decay": config.weight_decay}
        )
        # Megatron swaps each group's params for shards below and sets its weight decay
        # at every step: keep the model params, read the decay from the live group.
        self._routed = [(list(group["params"]), group, names) for group in param_groups]
        self._reported = False
        super().__init__(holder, config, grad_scaler, init_muon_state, **distributed_optimizer_args)
        self._muon_params = muon_params
        self._muon_record: list[str] | None = None  # set by sharded_state_dict
        tp = layout.expert_tp if EXPERT in exchange_groups else layout.tp
        self._records_routing = tp.rank == 0 and self.data_parallel_group.rank() == 0
        self._loading_checkpoint = False
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
            shard_groups,
            views,
            muon_config,
            exchange_groups,
            framework_skips_nonfinite=True,
            ns_load=ns_load,
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

    # -- dist checkpointing ---------------------------------------------------------
    #
    # Megatron 0.19.2 saves a distributed optimizer in "dp_reshardable" (buckets, DP size
    # may change; megatron.training's default) or "fully_reshardable" (per model
    # parameter, any DP/TP/PP; --dist-ckpt-optim-fully-reshardable) format; its third,
    # "fully_sharded_model_space", needs the flattened ShardedTensors 0.19.2 refuses. Both
    # read a shard's state through ``_get/_set_main_param_and_optimizer_states`` and want
    # the same keys for every parameter of a buffer: Adam's ``exp_avg`` and
    # ``exp_avg_sq``. So at that boundary a Muon shard's momentum is ``exp_avg`` (as in the
    # DeepSpeed adapter; in memory it stays ShardedMuon's fp32 ``momentum_buffer``) and its
    # ``exp_avg_sq`` a stand-in: a zero-stride zero when saving, scratch when loading,
    # never kept. "fully_reshardable" drops the stand-in (no zeros written); a
    # "dp_reshardable" bucket must be covered whole, so there Muon's part of it is written
    # as zeros, the bytes Megatron's Adam writes ("dp_reshardable" also refuses, whatever
    # the optimizer, a layout where a rank's shard of a bucket holds no parameter: "empty
    # bucket encountered"; the EP=2 MoE test model is one). Megatron's ``state_dict`` and
    # ``load_state_dict`` assume Adam's step (torch: in every shard's state; TE/apex: in
    # the group) and tell groups apart by lr/wd settings alone, while each Megatron group
    # here is a Muon and an AdamW half: those two are ours.
    #
    # Neither format says which parameters were Muon's (an AdamW parameter's exp_avg would
    # load as Muon momentum), so the non-per-parameter state holds a routing record: the
    # sorted names of this optimizer's Muon parameters, each named by its key in the
    # model's sharded state dict plus the layer and expert indices Megatron stacks there
    # (``decoder.layers.self_attention.linear_proj.weight[1]``). Those names are what
    # Megatron reshards by: the same on every TP and DP rank and under any TP/PP/EP
    # layout; gathered over the world, the record is identical on every rank, as
    # Megatron's common state must be (rank 0 writes it for "fully_reshardable", every
    # pipeline stage and EP rank compares against it) and as the per-TP/PP-rank object of
    # "dp_reshardable" is. Loading compares it with this run's before any state is copied
    # and names the parameters that changed route. The one case that fails before that
    # comparison: a "fully_reshardable" Muon parameter that is AdamW now, whose
    # ``exp_avg_sq`` the checkpoint lacks; with Megatron's default strictness
    # (assume_ok_unexpected) torch's loader refuses first on every rank, naming
    # ``optimizer.state.exp_avg_sq.<key>``; a strictness that drops requested keys the
    # checkpoint lacks (log_unexpected) reaches muon_ds's message. Checkpoints written
    # before the record existed still load, unchecked: refusing them would strand every
    # earlier checkpoint, nearly all resumed with the routing they were saved with.

    def sharded_state_dict(
        self,
        model_sharded_state_dict: ShardedStateDict,
        is_loading: bool = False,
        sharding_type: str | None = None,
        metadata: dict | None = None,
    ) -> ShardedStateDict:
        """Megatron's own sharded optimizer state, after creating any missing state.

        Without a named format, megatron.training's default "dp_reshardable" (Megatron
        core's default, "fully_sharded_model_space", cannot be saved by 0.19.2). Creating
        the state first (zeros before the first step) means a checkpoint always
        holds every shard's momentum or moments and a fresh optimizer has tensors for
        Megatron to load into.
        """
        metadata = dict(metadata or {})
        chosen = sharding_type or metadata.setdefault(
            "distrib_optim_sharding_type", "dp_reshardable"
        )
        if chosen not in CHECKPOINT_FORMATS:
            raise ValueError(
                f"muon_ds: distributed-optimizer checkpoint format {chosen!r} is not "
                f"supported; allowed: {', '.join(CHECKPOINT_FORMATS)}"
            )
        init_muon_state(self.optimizer)
        self._muon_record = self._routing_record(model_sharded_state_dict)
        self._loading_checkpoint = is_loading
        try:
            return super().sharded_state_dict(
                model_sharded_state_dict, is_loading, sharding_type, metadata
            )
        finally:
            self._loading_checkpoint = False

    def sharded_param_state_fully_reshardable(
        self,
        model_sharded_state_dict: ShardedStateDict,
        is_loading: bool = False,
        metadata: dict | None = None,
    ) -> ShardedStateDict | None:
        """Megatron's per-parameter state, without the Muon parameters' stand-in."""
        state = super().sharded_param_state_fully_reshardable(
            model_sharded_state_dict, is_loading, metadata
        )
        if state is None:  # memory-efficient mode: only DP rank 0 holds the state
            return None
        index = 0  # Megatron numbers every parameter of every buffer, local or not
        for buffer in self.buffers:
            for param in buffer.param_index_map:
                if param in self._muon_params:
                    del state[index]["exp_avg_sq"]
                index += 1
        return state

    def _get_main_param_and_optimizer_states(
        self, model_param: torch.nn.Parameter
    ) -> dict[str, torch.Tensor]:
        tensors = super()._get_main_param_and_optimizer_states(model_param)
        if MOMENTUM in tensors:
            momentum = tensors.pop(MOMENTUM)
            tensors["exp_avg"] = momentum
            tensors["exp_avg_sq"] = (
                torch.empty_like(momentum)
                if self._loading_checkpoint
                else momentum.new_zeros(()).expand_as(momentum)
            )
        return tensors

    def _set_main_param_and_optimizer_states(
        self, model_param: torch.nn.Parameter, tensors: Mapping[str, torch.Tensor]
    ) -> None:
        """Copy a loaded main-param shard and its state into place; a Muon shard takes
        ``exp_avg`` as its momentum and ignores the stand-in, ``step`` comes from the
        groups (``load_state_dict``)."""
        group_index, group_order = self.model_param_group_index_map[model_param]
        shard = self.optimizer.param_groups[group_index]["params"][group_order]
        state = self.optimizer.state[shard]
        targets = {"param": shard}
        if MOMENTUM in state:
            targets["exp_avg"] = state[MOMENTUM]
        else:
            targets.update({k: state[k] for k in ("exp_avg", "exp_avg_sq")})
        for key, target in targets.items():
            target.copy_(tensors[key])

    def _routing_record(self, model_sharded_state_dict: ShardedStateDict) -> list[str]:
        """The checkpoint names of every parameter this optimizer routes to Muon, on any
        rank (see the block above ``sharded_state_dict``). Collective over the world.

        TP ranks and DP replicas name the same parameters, so only one TP rank of one DP
        replica per pipeline stage and EP rank contributes: the gathered record is the
        model's size, not the world's.
        """
        tensors, _ = extract_sharded_tensors_and_factories(model_sharded_state_dict)
        by_param = {sharded.data: sharded for sharded in nested_values(tensors)}
        local, missing = [], []
        for param, name in self._muon_params.items():
            sharded = by_param.get(param)
            if sharded is None:
                missing.append(name)
                continue
            if not self._records_routing:
                continue
            if isinstance(sharded, ShardedTensorFactory):  # e.g. gated fc1: gate and up
                built = sharded.build()
                sharded = next(nested_values(built)) if isinstance(built, dict | list) else built
            stacked = list(sharded.global_offset[: sharded.prepend_axis_num])
            local.append(f"{sharded.key}{stacked}" if stacked else sharded.key)
        everyone: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(everyone, (local, missing))
        missing = sorted({name for _, names in everyone for name in names})
        if missing:  # raised on every rank alike
            raise ValueError(
                f"muon_ds: Muon parameters {missing[:_NAMES_SHOWN]} are not in the model's "
                "sharded state dict, so their route cannot be recorded; pass the model's "
                "own sharded_state_dict() (it references the parameters)"
            )
        return sorted({name for names, _ in everyone for name in names})

    def _check_routing(self, saved: Sequence[str]) -> None:
        """Refuse a checkpoint whose Muon parameters are not this run's, naming them."""
        if self._muon_record is None:
            raise RuntimeError(
                "muon_ds: a checkpoint's routing record is checked against this run's, "
                "made by sharded_state_dict(..., is_loading=True): call it before loading"
            )
        problem = routing_mismatch(
            dict.fromkeys(saved, "muon"), dict.fromkeys(self._muon_record, "muon")
        )
        if problem:
            raise ValueError(
                f"muon_ds: {problem} (Megatron: --muon-patterns/--muon-adamw-patterns, or "
                "--no-load-optim to start the optimizer afresh)"
            )

    def routed_tensors(self) -> list[RoutedTensor]:
        """This rank's model parameters: name, local shape, route and weight decay
        (``muon_ds.routing_report``; under TP the shapes are this rank's slices)."""
        return [
            RoutedTensor(names[p], tuple(p.shape), group["algorithm"], group["weight_decay"])
            for params, group, names in self._routed
            for p in params
        ]

    def step_with_ready_grads(self) -> bool:
        """Megatron's step; before the first, rank 0 prints this optimizer's routing."""
        if not self._reported:
            self._reported = True
            print_on_rank0(RoutingReport(tuple(self.routed_tensors())).lines())
        return super().step_with_ready_grads()

    def state_dict(self) -> dict[str, Any]:
        """The param groups (lr, wd, overrides, algorithm) with AdamW's step in each, as
        Megatron writes it, the loss scaler's state under fp16 (Megatron's key) and (once
        ``sharded_state_dict`` made it) the routing record: the state that is not
        per-parameter."""
        init_muon_state(self.optimizer)  # before any step (all skipped, or none run)
        step = self._adamw_step()
        groups = [
            {**{k: v for k, v in group.items() if k != "params"}, "step": step}
            for group in self.optimizer.param_groups
        ]
        common: dict[str, Any] = {"param_groups": groups}
        if self._muon_record is not None:
            common[ROUTING_RECORD] = self._muon_record
        state = {"optimizer": common}
        if self.grad_scaler:
            state["grad_scaler"] = self.grad_scaler.state_dict()
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Check the routing, restore groups, AdamW's step and the loss scaler, then the
        parameter state Megatron loaded.

        A checkpoint whose Muon parameters are not this run's fails with them named; one
        saved before muon_ds recorded its routing loads unchecked. Saved groups are
        matched to ours by Megatron's group identifiers plus the algorithm, so a
        checkpoint of another optimizer fails here with its groups named.
        """
        saved_record = state_dict["optimizer"].get(ROUTING_RECORD)
        if saved_record is not None:
            self._check_routing(saved_record)
        init_muon_state(self.optimizer)
        saved_groups = state_dict["optimizer"]["param_groups"]
        saved = {_group_identity(group): group for group in saved_groups}
        for group in self.optimizer.param_groups:
            identity = _group_identity(group)
            if identity not in saved:
                raise ValueError(
                    "muon_ds: the checkpoint has no param group "
                    f"{dict(zip(_IDENTITY, identity, strict=True))}; its groups are "
                    f"{[dict(zip(_IDENTITY, i, strict=True)) for i in saved]}. It was "
                    "saved by another optimizer: muon_ds loads only its own state"
                )
            group.update({k: v for k, v in saved[identity].items() if k != "step"})
        steps = {group["step"] for group in saved_groups}
        if len(steps) != 1:
            raise ValueError(f"muon_ds: the checkpoint's param groups disagree on step: {steps}")
        step = steps.pop()
        for group in self.optimizer.param_groups:
            if group["algorithm"] == "adamw":
                for shard in group["params"]:
                    self.optimizer.state[shard]["step"].fill_(step)
        # One saved without a scaler (bf16) starts it afresh from the config, as Megatron's.
        if self.grad_scaler and "grad_scaler" in state_dict:
            self.grad_scaler.load_state_dict(state_dict["grad_scaler"])
        if "param_state" in state_dict:
            loaders = {
                "dp_reshardable": self.load_parameter_state_from_dp_reshardable,
                "fully_reshardable": self.load_parameter_state_from_fully_reshardable,
            }
            loaders[state_dict["param_state_sharding_type"]](state_dict["param_state"])

    def _adamw_step(self) -> float:
        """AdamW's step count, the same on every DP rank (some may hold no AdamW shard)."""
        local = -1.0
        for group in self.optimizer.param_groups:
            if group["algorithm"] == "adamw":
                for shard in group["params"]:
                    local = max(local, self.optimizer.state[shard]["step"].item())
        step = torch.tensor([local], device=self.buffers[0].grad_data.device)
        dist.all_reduce(step, op=dist.ReduceOp.MAX, group=self.data_parallel_group)
        return max(step.item(), 0.0)

    def start_param_sync_for_bucket_group_subset(self) -> None:
        """All-gather the parameters of this optimizer's own buffers, once.

        Megatron 0.19.2's version walks every bucket group of the model, dense and
        expert alike, so with MoE each of the two chained distributed optimizers gathers
        every parameter and each one travels twice per step (its Adam does the same).
        """
        own = [bucket for buffer in self.buffers for bucket in buffer.buckets]
        patches.start_own_param_sync(self.model_chunks, own)

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


def report_muon_ds_work(optimizer: ChainedOptimizer) -> str:
    """Print (and return) this rank's counted Newton-Schulz matrices and Muon exchange
    bytes over the run: what an entry point says when ``pretrain()`` returns."""
    ns_matrices = bytes_sent = 0
    for part in optimizer.chained_optimizers:
        counter = part.optimizer.counter
        ns_matrices += counter.ns_matrices
        bytes_sent += counter.exchange_bytes()
    line = (
        f"muon_ds: rank {dist.get_rank()}: Newton-Schulz on {ns_matrices} "
        f"matrices, {bytes_sent} Muon exchange bytes sent over this run"
    )
    print(line, flush=True)
    return line


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


CHECKPOINT_FORMATS = ("dp_reshardable", "fully_reshardable")
"""Megatron's distributed-optimizer checkpoint formats muon_ds saves and loads."""

ROUTING_RECORD = "muon_ds_muon_params"
"""Key of the routing record in the optimizer's non-per-parameter state."""
_NAMES_SHOWN = 4

_IDENTITY = ("algorithm", *param_group_identifier_keys)


def _group_identity(group: Mapping[str, Any]) -> tuple[Any, ...]:
    return tuple(group.get(key) for key in _IDENTITY)


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
    knob comes from ``muon_config``. Exchange groups: a dense parameter split over TP is
    one logical matrix held by all DP x TP ranks, so it is exchanged over the
    tensor-and-data-parallel group (with context parallelism, whose ranks share the DP
    shards); a dense parameter whole on each TP rank over the DP group; an expert over the
    expert-data-parallel group of its EP rank, or, split over expert TP, over that group
    times expert TP (``expert_tensor_and_data_group``). The TP/DP x TP groups must be one
    distributed-optimizer instance (``num_distributed_optimizer_instances == 1``).
    ``tp_mode="blockwise"`` makes each TP rank's block of a TP-split weight its own
    matrix (exchanged over the DP group alone), as Megatron's blockwise mode does.
    """
    if not config.use_distributed_optimizer:
        raise ValueError("muon_ds needs --use-distributed-optimizer (ZeRO-1 sharded state)")
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
    layout = model_layout(model_chunks, qkv_split, tp_mode)
    names = {}
    for index, chunk in enumerate(model_chunks):
        for name, param in chunk.named_parameters():
            names[param] = name if len(model_chunks) == 1 else f"chunk{index}.{name}"

    ns_load: dict[int, int] = {}

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
            ns_load=ns_load,
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

    dense = build(
        False,
        exchange_groups={DENSE: data_parallel, DENSE_TP: tensor_and_data},
        data_parallel_group=data_parallel,
        data_parallel_group_gloo=groups["intra_dp_cp_group_gloo"],
        data_parallel_group_idx=get_pg_rank(groups["mp_group"]),
    )
    expert_groups = {EXPERT: groups["intra_expt_dp_group"]}
    if layout.local_experts and layout.expert_tp.size > 1 and tp_mode == "whole":
        expert_groups[EXPERT_TP] = expert_tensor_and_data_group(
            parallel_state.get_expert_tensor_parallel_group(), groups["intra_expt_dp_group"]
        )
    experts = build(
        True,
        exchange_groups=expert_groups,
        data_parallel_group=groups["intra_expt_dp_group"],
        data_parallel_group_gloo=groups["intra_expt_dp_group_gloo"],
        data_parallel_group_idx=get_pg_rank(groups["expt_tp_pp_with_egtp_remat_group"]),
    )
    optimizers = [o for o in (dense, experts) if o is not None]
    if dist.get_rank() == 0:
        # Beside the effective-config line muon_config_from_args printed: what "auto" became.
        device = next(p.device for chunk in model_chunks for p in chunk.parameters())
        ns = describe_ns_dtype(muon_config.ns_dtype, device)
        print(f"muon_ds: Newton-Schulz and exchange in {ns}", flush=True)
    return ChainedOptimizer(optimizers)


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
