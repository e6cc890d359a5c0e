"""Pure tensor math of Muon and AdamW: no torch.distributed, no framework."""

from muon_ds.math.newton_schulz import (
    MOONLIGHT_COEFFICIENTS,
    POLAR_EXPRESS_COEFFICIENTS,
    coefficient_schedule,
    newton_schulz,
    newton_schulz_flops,
)
from muon_ds.math.updates import (
    MOMENTUM,
    adamw_state,
    adamw_step,
    all_finite,
    apply_muon_update,
    ensure_state,
    matrix_shape,
    muon_direction,
    update_scale,
)

__all__ = [
    "MOMENTUM",
    "MOONLIGHT_COEFFICIENTS",
    "POLAR_EXPRESS_COEFFICIENTS",
    "adamw_state",
    "adamw_step",
    "all_finite",
    "apply_muon_update",
    "coefficient_schedule",
    "ensure_state",
    "matrix_shape",
    "muon_direction",
    "newton_schulz",
    "newton_schulz_flops",
    "update_scale",
]
