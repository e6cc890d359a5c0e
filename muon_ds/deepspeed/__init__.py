"""DeepSpeed integration: ``"optimizer": {"type": "MuonDS", "params": {...}}`` under ZeRO-1/2/3.

``import muon_ds.deepspeed`` (the launchers in ``launch/`` do it) registers the type
through ``muon_ds.patches.deepspeed``: ZeRO may wrap the class, the engine builds it from
the config with its module in hand, and every muon_ds optimizer handed to
``deepspeed.initialize`` (config-built or not) is checked against the ZeRO settings
before ZeRO wraps it, and records its routing in the ZeRO checkpoints it writes.
``"params"`` are ``MuonConfig`` keys (with DeepSpeed's ``betas`` and ``eps``); a bad one
fails inside ``deepspeed.initialize``.
"""

from __future__ import annotations

from typing import Any

import torch

from muon_ds.deepspeed.checkpoint import ROUTING_RECORD
from muon_ds.deepspeed.groups import GROUP_KEY
from muon_ds.deepspeed.optimizer import OrthogonalizedZeroOptimizer
from muon_ds.deepspeed.support import UnsupportedDeepSpeedSetupError
from muon_ds.patches import deepspeed as patches
from muon_ds.patches.deepspeed_zero import zero_settings

OPTIMIZER_TYPE = "MuonDS"
"""The JSON type name; it must not lower-case to a DeepSpeed built-in ("muon")."""


def register() -> None:
    """Make ``"type": "MuonDS"`` buildable by ``deepspeed.initialize`` (idempotent)."""
    patches.allow_under_zero(OrthogonalizedZeroOptimizer)
    patches.build_from_config(OPTIMIZER_TYPE, _build_from_config)
    patches.adopt_client_optimizers(_before_wrap, _after_wrap)


def _build_from_config(
    engine: Any, model_parameters: list[Any], params: dict[str, Any]
) -> OrthogonalizedZeroOptimizer:
    """The config route: the engine's module names the parameters."""
    optimizer = OrthogonalizedZeroOptimizer(model_parameters, model=engine.module, **params)
    optimizer.attach(engine)
    return optimizer


def _before_wrap(engine: Any, optimizer: torch.optim.Optimizer) -> None:
    """A client optimizer, before ZeRO wraps it: ours is checked against the engine; any
    other holding our param groups means ours was replaced behind the user's back."""
    if isinstance(optimizer, OrthogonalizedZeroOptimizer):
        optimizer.attach(engine)
        return
    if any(GROUP_KEY in group for group in optimizer.param_groups):
        raise UnsupportedDeepSpeedSetupError(
            f"deepspeed.initialize got a {type(optimizer).__name__} holding the param groups "
            f"of a MuonDS optimizer (they carry {GROUP_KEY!r}): MuonDS was replaced before "
            "DeepSpeed saw it. Hugging Face Accelerate does that under offload_optimizer "
            "(it swaps client optimizers for DeepSpeedCPUAdam); MuonDS does not support "
            "offload_optimizer: remove it from zero_optimization"
        )


def _after_wrap(engine: Any) -> None:
    """Once ZeRO wrapped ours: its checkpoints record and check our routing (and under
    stage 3 its universal loader keeps each param group's own settings)."""
    optimizer = getattr(engine, "basic_optimizer", None)
    if isinstance(optimizer, OrthogonalizedZeroOptimizer) and engine.optimizer is not optimizer:
        patches.record_in_zero_checkpoints(
            engine.optimizer,
            ROUTING_RECORD,
            optimizer.routing_record,
            optimizer.check_routing_record,
        )
        if zero_settings(engine).stage == 3:
            patches.restore_groups_on_zero3_universal_load(engine.optimizer)


register()

__all__ = [
    "OPTIMIZER_TYPE",
    "OrthogonalizedZeroOptimizer",
    "UnsupportedDeepSpeedSetupError",
    "register",
]
