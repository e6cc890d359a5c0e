"""What muon_ds refuses under DeepSpeed, with the reason and what to change.

Checked twice: the ZeRO settings when the engine hook attaches the optimizer (inside
``deepspeed.initialize``, before ZeRO wraps it), and what ZeRO really built at the first
step, so a path that skipped the hook is caught too.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from muon_ds.patches import deepspeed_zero as zero


class UnsupportedDeepSpeedSetupError(RuntimeError):
    """The DeepSpeed configuration is one muon_ds does not train correctly."""


def refuse_unsupported(settings: zero.ZeroSettings) -> None:
    """Refuse ZeRO settings muon_ds does not train correctly."""
    if settings.stage not in (1, 2):
        raise UnsupportedDeepSpeedSetupError(
            f"MuonDS needs zero_optimization stage 1 or 2, got {settings.stage}: it shards "
            "Muon's momentum like ZeRO-1 and exchanges only partition-straddling matrices"
        )
    if settings.offload_optimizer:
        raise UnsupportedDeepSpeedSetupError(
            "MuonDS does not support offload_optimizer; remove it from zero_optimization"
        )
    if settings.round_robin_gradients:
        raise UnsupportedDeepSpeedSetupError(
            "MuonDS does not support round_robin_gradients: DeepSpeed 0.19.8's partition map "
            "(_hp_mapping) does not follow the round-robin order; set it to false"
        )


def check_what_zero_built(model_params: Iterable[torch.Tensor]) -> None:
    """What ZeRO built must be stage 1/2 without offload, whatever path built the
    optimizer (the engine hook checked the settings already; this holds without it too)."""
    for param in model_params:
        if zero.is_zero3_param(param):
            raise UnsupportedDeepSpeedSetupError("MuonDS supports ZeRO stage 1 and 2, not stage 3")
        if not zero.is_zero12_param(param):
            raise UnsupportedDeepSpeedSetupError(
                "MuonDS steps inside a DeepSpeed engine with zero_optimization stage 1 "
                f"or 2, but a parameter of shape {tuple(param.shape)} is not "
                "partitioned by ZeRO: name MuonDS in the config or pass it to "
                "deepspeed.initialize(optimizer=...)"
            )
        fragment = zero.partition_fragment(param)
        if fragment is not None and fragment.offloaded:
            raise UnsupportedDeepSpeedSetupError(
                "MuonDS does not support offload_optimizer; remove it from zero_optimization"
            )
