"""Reads of what DeepSpeed's ZeRO sets on the engine and attaches to each parameter.

Each guarded like ``muon_ds.patches.deepspeed`` (same ``DEEPSPEED_RANGE``); what each touches
in DeepSpeed 0.19.8:

``zero_settings``
    ``engine.zero_optimization_stage()``, ``engine.zero_cpu_offload()`` and
    ``engine._config.zero_config.round_robin_gradients``.
``is_zero12_param``, ``partition_fragment``, ``data_parallel_group``, ``is_zero3_param``
    What ZeRO attaches to each model parameter: ``_hp_mapping`` (a ``tensor_fragment``:
    ``lp_fragment_address``, ``hp_fragment_address``, ``use_offload``), ``_dp_group``,
    and stage 3's ``ds_id``.
``link_optimizer_state``
    ``deepspeed.utils.mixed_precision_linkage.lazy_init_hp_params_optimizer_state``.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any

import torch

from muon_ds.patches import PatchError, require_attribute
from muon_ds.patches.deepspeed import check_version


@dataclass(frozen=True)
class ZeroSettings:
    """The ZeRO settings muon_ds refuses or depends on, read from a DeepSpeed engine."""

    stage: int
    offload_optimizer: bool
    round_robin_gradients: bool


def zero_settings(engine: Any) -> ZeroSettings:
    """The engine's ZeRO stage, optimizer offload and round-robin gradient setting."""
    patch = "muon_ds.patches.deepspeed_zero.zero_settings"
    check_version(patch)
    stage = require_attribute(engine, "zero_optimization_stage", patch)()
    offload = require_attribute(engine, "zero_cpu_offload", patch)()
    config = require_attribute(engine, "_config", patch)
    zero_config = require_attribute(config, "zero_config", patch)
    round_robin = require_attribute(zero_config, "round_robin_gradients", patch)
    return ZeroSettings(int(stage), bool(offload), bool(round_robin))


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
