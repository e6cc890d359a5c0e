"""Options every communication benchmark contender receives, and the tokens it trains on."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from benchmarks.shapes import ModelShape


@dataclass(frozen=True)
class RunOptions:
    """What the driver passes to ``run(rank, world, shape, options)``.

    Every contender trains ``warmup + steps`` steps from the same ``seed`` on the same
    synthetic tokens; counters are reset after ``warmup``, so counts and times cover
    ``steps`` measured steps.
    """

    steps: int = 5
    warmup: int = 2
    lr: float = 1e-3
    """One lr for Muon's matrices and AdamW's parameters (Moonlight's matched-RMS rule)."""
    weight_decay: float = 0.1
    seed: int = 0
    dtype: str = "fp32"
    """Training precision: ``fp32`` (the CPU default) or ``bf16``."""
    layout: str = ""
    """The layout the driver chose from the contender's ``LAYOUTS`` (e.g. ``"TP=2xDP=2"``);
    empty means plain data parallelism over every rank."""

    def __post_init__(self) -> None:
        if self.steps < 1 or self.warmup < 0:
            raise ValueError(
                f"steps={self.steps}, warmup={self.warmup}: expected steps >= 1, warmup >= 0"
            )
        if self.dtype not in ("fp32", "bf16"):
            raise ValueError(f"dtype={self.dtype!r} is not allowed: expected 'fp32' or 'bf16'")


def tokens(shape: ModelShape, options: RunOptions, step: int, dp_rank: int) -> torch.Tensor:
    """``[micro_batch, seq + 1]`` token ids for one DP rank's step: inputs and shifted targets.

    Uniform random ids from a generator seeded by (seed, step, DP rank), so every contender
    and framework sees the same batches at the same DP rank.
    """
    generator = torch.Generator().manual_seed(options.seed * 1_000_003 + step * 1_009 + dp_rank)
    return torch.randint(0, shape.vocab, (shape.micro_batch, shape.seq + 1), generator=generator)
