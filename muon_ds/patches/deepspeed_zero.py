"""Reads of what DeepSpeed's ZeRO sets on the engine and attaches to each parameter.

Each guarded like ``muon_ds.patches.deepspeed`` (same ``DEEPSPEED_RANGE``); what each touches
in DeepSpeed 0.19.8:

``zero_settings``
    ``engine.zero_optimization_stage()``, ``engine.zero_offload_optimizer()``,
    ``engine.zero_offload_param()``, ``engine.zero_hpz_partition_size()``,
    ``engine.autotp_size()`` and ``engine._config``'s ``zero_config``
    (``round_robin_gradients``, ``zero_quantized_weights``, ``zero_quantized_gradients``,
    ``zenflow``) and ``expert_parallel_config.enabled`` (AutoEP).
``is_zero12_param``, ``partition_fragment``, ``data_parallel_group``, ``is_zero3_param``
    What ZeRO attaches to each model parameter: ``_hp_mapping`` (a ``tensor_fragment``:
    ``lp_fragment_address``, ``hp_fragment_address``, ``use_offload``), ``_dp_group``,
    and stage 3's ``ds_id``.
``full_shape``, ``zero3_partition``
    Stage 3's per-parameter ``ds_shape``, ``ds_numel``, ``partition_numel()`` and
    ``_z3_optimizer`` (the ``DeepSpeedZeroOptimizer_Stage3``), and on it
    ``get_param_id``, ``grad_position`` (sub-group, offset in its flat partition),
    ``fp32_partitioned_groups_flat`` and ``sub_group_process_groups``.
``link_optimizer_state``
    ``deepspeed.utils.mixed_precision_linkage.lazy_init_hp_params_optimizer_state``.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from muon_ds.patches import PatchError, require_attribute
from muon_ds.patches.deepspeed import check_version


@dataclass(frozen=True)
class ZeroSettings:
    """The ZeRO settings muon_ds refuses or depends on, read from a DeepSpeed engine."""

    stage: int
    offload_optimizer: bool
    round_robin_gradients: bool
    offload_param: bool = False
    hpz: bool = False
    """ZeRO++'s hierarchical (secondary) weight partition (``zero_hpz_partition_size > 1``)."""
    quantized: bool = False
    """ZeRO++'s quantized weights or gradients."""
    autotp: bool = False
    """AutoTP (``tensor_parallel.autotp_size > 1``)."""
    autoep: bool = False
    zenflow: bool = False


def zero_settings(engine: Any) -> ZeroSettings:
    """The engine's ZeRO stage and the settings muon_ds refuses (``ZeroSettings``)."""
    patch = "muon_ds.patches.deepspeed_zero.zero_settings"
    check_version(patch)
    config = require_attribute(engine, "_config", patch)
    zero_config = require_attribute(config, "zero_config", patch)
    expert_parallel = require_attribute(config, "expert_parallel_config", patch)

    def offloaded(settings: Any) -> bool:
        # An offload config's device is a str enum: "none", "cpu" or "nvme".
        return settings is not None and require_attribute(settings, "device", patch) != "none"

    def read(name: str) -> Any:
        return require_attribute(engine, name, patch)()

    return ZeroSettings(
        stage=int(read("zero_optimization_stage")),
        offload_optimizer=offloaded(read("zero_offload_optimizer")),
        round_robin_gradients=bool(require_attribute(zero_config, "round_robin_gradients", patch)),
        offload_param=offloaded(read("zero_offload_param")),
        hpz=int(read("zero_hpz_partition_size")) > 1,
        quantized=bool(require_attribute(zero_config, "zero_quantized_weights", patch))
        or bool(require_attribute(zero_config, "zero_quantized_gradients", patch)),
        autotp=int(read("autotp_size") or 0) > 1,
        autoep=bool(getattr(expert_parallel, "enabled", False)),
        zenflow=require_attribute(zero_config, "zenflow", patch) is not None,
    )


@dataclass(frozen=True)
class Fragment:
    """Which elements of a model parameter this rank's flat fp32 partition holds, and where.

    ``param_start``: first element in the flattened parameter; ``partition_start``: where
    it lies in the partition; ``numel``: how many.
    """

    param_start: int
    partition_start: int
    numel: int
    offloaded: bool


def is_zero12_param(param: torch.Tensor) -> bool:
    """Whether ZeRO stage 1/2 partitions ``param``: it links every such parameter to its
    partition (``_hp_mapping``, ``None`` where this rank holds none of it)."""
    return hasattr(param, "_hp_mapping")


def partition_fragment(param: torch.Tensor) -> Fragment | None:
    """What ZeRO 1/2 put in this rank's partition of ``param`` (``None``: nothing).

    Raises PatchError when ``param`` carries no ``_hp_mapping`` at all (check
    ``is_zero12_param`` first): then no ZeRO 1/2 optimizer partitions it.
    """
    patch = "muon_ds.patches.deepspeed_zero.partition_fragment"
    if not hasattr(param, "_hp_mapping"):
        raise PatchError(
            f"{patch}: a parameter of shape {tuple(param.shape)} has no _hp_mapping, the "
            "partition map ZeRO stage 1/2 attaches; it is not partitioned by ZeRO 1/2"
        )
    mapping = param._hp_mapping
    if mapping is None:
        return None
    lp = require_attribute(mapping, "lp_fragment_address", patch)
    hp = require_attribute(mapping, "hp_fragment_address", patch)
    return Fragment(
        param_start=lp.start,
        partition_start=hp.start,
        numel=lp.numel,
        offloaded=bool(require_attribute(mapping, "use_offload", patch)),
    )


def data_parallel_group(param: torch.Tensor) -> Any:
    """The process group ZeRO partitions ``param`` over (the expert-DP group for MoE).

    ZeRO 1/2 sets ``_dp_group`` beside ``_hp_mapping`` on every parameter it links; a
    partitioned parameter without it means DeepSpeed changed (PatchError).
    """
    return require_attribute(
        param, "_dp_group", "muon_ds.patches.deepspeed_zero.data_parallel_group"
    )


def is_zero3_param(param: torch.Tensor) -> bool:
    """Whether ZeRO stage 3 has taken ``param`` over (it tags every such param ``ds_id``)."""
    return hasattr(param, "ds_id")


def is_zero3_stepped(param: torch.Tensor) -> bool:
    """Whether a ZeRO-3 optimizer steps ``param`` (it links each one it partitions)."""
    return hasattr(param, "_z3_optimizer")


def full_shape(param: torch.Tensor) -> tuple[int, ...]:
    """``param``'s full shape: ZeRO-3 empties a partitioned parameter's data (also
    under ``zero.Init``, before the engine exists) and keeps the shape as ``ds_shape``."""
    if is_zero3_param(param):
        patch = "muon_ds.patches.deepspeed_zero.full_shape"
        return tuple(require_attribute(param, "ds_shape", patch))
    return tuple(param.shape)


@dataclass(frozen=True)
class Zero3Partition:
    """This rank's range of one ZeRO-3 parameter in the flat fp32 partition it steps.

    ZeRO-3 gives rank ``r`` of a parameter's partition group the elements
    ``[r * p, (r + 1) * p)`` of the flattened parameter, ``p = ceil(numel / W)``, the
    last ranks padding past its end (a rank may hold padding only: ``numel == 0``).
    """

    sub_group: int
    """The ZeRO-3 sub-group, whose flat fp32 partition ``buffer`` the optimizer steps."""
    buffer: torch.Tensor
    offset: int
    """Where this rank's range starts in ``buffer``."""
    param_start: int
    """First element of the flattened parameter held."""
    numel: int
    """Elements held (padding not counted)."""
    group: Any
    """The process group the parameter is partitioned over."""


def zero3_partition(param: torch.Tensor) -> Zero3Partition:
    """Where ZeRO stage 3 keeps this rank's range of ``param`` (``is_zero3_param``)."""
    patch = "muon_ds.patches.deepspeed_zero.zero3_partition"
    check_version(patch)
    zero3 = require_attribute(param, "_z3_optimizer", patch)
    param_id = require_attribute(zero3, "get_param_id", patch)(param)
    sub_group, offset, per_rank = require_attribute(zero3, "grad_position", patch)[param_id]
    group = require_attribute(zero3, "sub_group_process_groups", patch)[sub_group]
    numel = int(require_attribute(param, "ds_numel", patch))
    if per_rank != require_attribute(param, "partition_numel", patch)():
        raise PatchError(f"{patch}: grad_position and partition_numel() disagree")
    start = min(numel, dist.get_rank(group=group) * per_rank)
    return Zero3Partition(
        sub_group=sub_group,
        buffer=require_attribute(zero3, "fp32_partitioned_groups_flat", patch)[sub_group],
        offset=offset,
        param_start=start,
        numel=min(numel, start + per_rank) - start,
        group=group,
    )


def link_optimizer_state(
    model_params: list[torch.Tensor], flat_partition: torch.Tensor, state: Any
) -> None:
    """Point each model param's fragment at its slice of ``state[flat_partition]``, so
    ``deepspeed.utils.safe_get_full_optimizer_state`` reads the optimizer's state."""
    patch = "muon_ds.patches.deepspeed_zero.link_optimizer_state"
    check_version(patch)
    linkage = importlib.import_module("deepspeed.utils.mixed_precision_linkage")
    link = require_attribute(linkage, "lazy_init_hp_params_optimizer_state", patch)
    link(model_params, flat_partition, state)
