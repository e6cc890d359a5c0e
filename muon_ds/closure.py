"""The ``closure`` argument of ``torch.optim.Optimizer.step``, as every muon_ds optimizer
takes it."""

from __future__ import annotations

from collections.abc import Callable

import torch


def loss_from_closure(closure: Callable[[], float] | None) -> float | None:
    """Re-evaluate the model through ``closure`` (if given) and return its loss.

    ``step`` runs under ``torch.no_grad``; the closure recomputes gradients, so it gets
    autograd back, as in torch's own optimizers.
    """
    if closure is None:
        return None
    with torch.enable_grad():
        return closure()
