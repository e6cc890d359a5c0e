"""Megatron's distributed checkpoints of muon_ds's optimizer state.

Formats. Megatron 0.19.2 saves a distributed optimizer in "dp_reshardable" (buckets, DP
size may change; megatron.training's default) or "fully_reshardable" (per model parameter,
any DP/TP/PP; --dist-ckpt-optim-fully-reshardable); its third, "fully_sharded_model_space",
needs the flattened ShardedTensors 0.19.2 refuses.

Keys. Both read a shard's state through ``_get/_set_main_param_and_optimizer_states`` and
want Adam's ``exp_avg`` and ``exp_avg_sq`` for every parameter of a buffer. So at that
boundary a Muon shard's momentum is ``exp_avg`` (in memory it stays ShardedMuon's fp32
``momentum_buffer``) and its ``exp_avg_sq`` a stand-in: a zero-stride zero when saving,
scratch when loading, never kept. "fully_reshardable" drops the stand-in; a
"dp_reshardable" bucket must be covered whole, so there Muon's part is written as zeros,
the bytes Megatron's Adam writes. Megatron's ``state_dict``/``load_state_dict`` assume
Adam's step and tell groups apart by lr/wd alone, while each Megatron group here is a Muon
and an AdamW half: those two are ours.

Routing record. Neither format says which parameters were Muon's (an AdamW parameter's
``exp_avg`` would load as Muon momentum), so the non-per-parameter state holds the sorted
names of this optimizer's Muon parameters, each its key in the model's sharded state dict
plus the layer/expert indices Megatron stacks there
(``decoder.layers.self_attention.linear_proj.weight[1]``): the names Megatron reshards by,
the same on every rank and under any TP/PP/EP layout. Loading compares it with this run's
before any state is copied and names the parameters that changed route. One case fails
earlier: a "fully_reshardable" Muon parameter that is AdamW now lacks ``exp_avg_sq``, and
torch's loader refuses first (Megatron's default strictness). Checkpoints written before the
record existed load unchecked, so earlier checkpoints are not stranded.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.distributed as dist
from megatron.core.dist_checkpointing.dict_utils import nested_values
from megatron.core.dist_checkpointing.mapping import ShardedStateDict, ShardedTensorFactory
from megatron.core.dist_checkpointing.utils import extract_sharded_tensors_and_factories
from megatron.core.optimizer import OptimizerConfig
from megatron.core.optimizer.optimizer import param_group_identifier_keys

from muon_ds.math import MOMENTUM, ensure_state
from muon_ds.routing import routing_mismatch
from muon_ds.sharded import ShardedMuon

CHECKPOINT_FORMATS = ("dp_reshardable", "fully_reshardable")
"""Megatron's distributed-optimizer checkpoint formats muon_ds saves and loads."""

ROUTING_RECORD = "muon_ds_muon_params"
"""Key of the routing record in the optimizer's non-per-parameter state."""
_NAMES_SHOWN = 4

_IDENTITY = ("algorithm", *param_group_identifier_keys)


def _group_identity(group: Mapping[str, Any]) -> tuple[Any, ...]:
    return tuple(group.get(key) for key in _IDENTITY)


def init_muon_state(optimizer: ShardedMuon, config: OptimizerConfig | None = None) -> None:
    """Create every shard's state as ``ShardedMuon.step`` would, before any step.

    Megatron calls this before loading a checkpoint into a fresh optimizer, so the
    state tensors exist to be filled (the role Adam's ``init_state_fn`` plays).
    """
    for group in optimizer.param_groups:
        for shard in group["params"]:
            ensure_state(optimizer.state[shard], shard, group["algorithm"])


class MuonCheckpointing:
    """The checkpoint methods of ``MuonDistributedOptimizer`` (see the module docstring).

    A mixin placed before Megatron's ``DistributedOptimizer``: it overrides that class's
    checkpoint hooks and reads what the optimizer sets up (``optimizer``, the inner
    ``ShardedMuon``; ``_muon_params``; ``_records_routing``; ``buffers``; ``grad_scaler``).
    """

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
