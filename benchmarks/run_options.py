"""Options every communication benchmark contender receives (one frozen value per run)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class RunOptions:
    """What the driver passes to ``run(rank, world, shape, options)``.

    Every contender trains ``warmup + steps`` steps from the same ``seed`` on the same
    synthetic tokens; counters are reset after ``warmup``, so counts and times cover
    ``steps`` measured steps.
    """

    steps: int = 5
    warmup: int = 2
    lr: float = 2e-3
    """Peak lr shared by Muon's matrices and AdamW's parameters (Moonlight's matched lr)."""
    weight_decay: float = 0.1
    seed: int = 0
    dtype: str = "fp32"
    """``fp32`` (CPU default) or ``bf16``."""

    def __post_init__(self) -> None:
        if self.steps < 1 or self.warmup < 0:
            raise ValueError(
                f"steps={self.steps}, warmup={self.warmup}: expected steps >= 1, warmup >= 0"
            )
        if self.dtype not in ("fp32", "bf16"):
            raise ValueError(f"dtype={self.dtype!r} is not allowed: expected 'fp32' or 'bf16'")
