"""DeepSpeed integration: ``"optimizer": {"type": "MuonDS", "params": {...}}`` under ZeRO-1/2.

``import muon_ds.deepspeed`` (the launchers in ``launch/`` do it) registers the type:
DeepSpeed resolves an optimizer type it does not ship via ``getattr(torch.optim, type)``,
and lets ZeRO wrap only classes listed in ``ZERO_SUPPORTED_OPTIMIZERS``. ``"params"``
are ``MuonConfig`` keys; a bad one fails inside ``deepspeed.initialize``.
"""

from __future__ import annotations

import torch
from deepspeed.runtime.zero import utils as zero_utils

from muon_ds.deepspeed.optimizer import DeepSpeedZeroOrtho, UnsupportedDeepSpeedSetupError

OPTIMIZER_TYPE = "MuonDS"
"""The JSON type name; it must not lower-case to a DeepSpeed built-in ("muon")."""


def register() -> None:
    """Make ``"type": "MuonDS"`` buildable by ``deepspeed.initialize`` (idempotent)."""
    setattr(torch.optim, OPTIMIZER_TYPE, DeepSpeedZeroOrtho)
    if DeepSpeedZeroOrtho not in zero_utils.ZERO_SUPPORTED_OPTIMIZERS:
        zero_utils.ZERO_SUPPORTED_OPTIMIZERS.append(DeepSpeedZeroOrtho)


register()

__all__ = ["OPTIMIZER_TYPE", "DeepSpeedZeroOrtho", "UnsupportedDeepSpeedSetupError", "register"]
