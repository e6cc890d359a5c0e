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


STAGE3_UNCOVERED = {
    "offload_param": "offload_param",
    "hpz": "ZeRO++'s zero_hpz_partition_size > 1",
    "quantized": "ZeRO++'s zero_quantized_weights / zero_quantized_gradients",
    "autotp": "AutoTP (tensor_parallel.autotp_size > 1)",
    "autoep": "AutoEP (expert_parallel)",
    "zenflow": "ZenFlow (zero_optimization.zenflow)",
}
"""ZeRO-3 features muon_ds has not been tested under (a true ``ZeroSettings`` field: what
the user set); each changes where a rank's partition lives or how its gradient arrives."""


def refuse_unsupported(settings: zero.ZeroSettings) -> None:
    """Refuse ZeRO settings muon_ds does not train correctly."""
    if settings.stage not in (1, 2, 3):
        raise UnsupportedDeepSpeedSetupError(
            f"MuonDS needs zero_optimization stage 1, 2 or 3, got {settings.stage}: it "
            "shards Muon's momentum with ZeRO's partitions"
        )
    if settings.offload_optimizer:
        raise UnsupportedDeepSpeedSetupError(
            "MuonDS does not support offload_optimizer; remove it from zero_optimization"
        )
    for field, feature in STAGE3_UNCOVERED.items():
        if getattr(settings, field):
            raise UnsupportedDeepSpeedSetupError(
                f"MuonDS does not support {feature} yet (it runs ZeRO stage 3 with "
                "partitions on the device, without ZeRO++, AutoTP, AutoEP or ZenFlow); "
                "remove it from the config"
            )
    if settings.round_robin_gradients:
        raise UnsupportedDeepSpeedSetupError(
            "MuonDS does not support round_robin_gradients: DeepSpeed 0.19.8's partition map "
            "(_hp_mapping) does not follow the round-robin order; set it to false"
        )


def check_what_zero_built(model_params: Iterable[torch.Tensor]) -> bool:
    """What ZeRO built must be stage 1/2 without offload or stage 3, the same stage for
    every parameter, whatever path built the optimizer (the engine hook checked the
    settings already; this holds without it too). True for stage 3."""
    params = list(model_params)
    zero3 = [zero.is_zero3_param(p) for p in params]
    if any(zero3) and not all(zero3):
        raise UnsupportedDeepSpeedSetupError(
            "MuonDS found parameters partitioned by ZeRO stage 3 beside others that are "
            "not; give DeepSpeed every parameter the optimizer steps"
        )
    if params and all(zero3):
        if not all(zero.is_zero3_stepped(p) for p in params):
            raise UnsupportedDeepSpeedSetupError(
                "MuonDS steps ZeRO stage 3 partitions inside a DeepSpeed engine, but these "
                "parameters (from zero.Init?) have no ZeRO-3 optimizer: name MuonDS in the "
                "config or pass it to deepspeed.initialize(optimizer=...)"
            )
        return True
    for param in params:
        if not zero.is_zero12_param(param):
            raise UnsupportedDeepSpeedSetupError(
                "MuonDS steps inside a DeepSpeed engine with zero_optimization stage 1, "
                f"2 or 3, but a parameter of shape {tuple(param.shape)} is not "
                "partitioned by ZeRO: name MuonDS in the config or pass it to "
                "deepspeed.initialize(optimizer=...)"
            )
        fragment = zero.partition_fragment(param)
        if fragment is not None and fragment.offloaded:
            raise UnsupportedDeepSpeedSetupError(
                "MuonDS does not support offload_optimizer; remove it from zero_optimization"
            )
    return False
