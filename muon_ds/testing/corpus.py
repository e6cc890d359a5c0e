"""An embedded byte-level corpus and its batches, for demos, tests and benchmarks.

Nothing is downloaded: the corpus is Python's own standard library, read from the
interpreter's install. Batches are a function of ``(seed, step)`` alone, so every optimizer
(and every rank) sees the same data in the same order, and a rank can take its rows of the
global batch.
"""

from __future__ import annotations

import sysconfig
from dataclasses import dataclass
from pathlib import Path

import torch


@dataclass(frozen=True)
class Corpus:
    """Byte tokens of whole files, split by file so validation text is never trained on."""

    train: torch.Tensor
    """uint8 tokens of the training files, concatenated."""

    val: torch.Tensor
    """uint8 tokens of the validation files, concatenated."""

    train_files: tuple[str, ...]
    """Names of the training files, in corpus order."""

    val_files: tuple[str, ...]
    """Names of the validation files, in corpus order."""


def stdlib_corpus(max_bytes: int = 3_000_000, val_every: int = 10) -> Corpus:
    """Python's top-level standard-library ``.py`` files in name order, until ``max_bytes``.

    Deterministic for a given Python version (the stdlib differs across versions; the
    demo records the file list's size and names). Every ``val_every``-th file goes to
    validation: held-out whole files measure generalisation, not memorised neighbours.
    """
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    train: list[tuple[str, bytes]] = []
    val: list[tuple[str, bytes]] = []
    total = 0
    for i, path in enumerate(sorted(stdlib.glob("*.py"))):
        if total >= max_bytes:
            break
        data = path.read_bytes()
        total += len(data)
        (val if i % val_every == val_every - 1 else train).append((path.name, data))
    if not train or not val:
        raise RuntimeError(f"too few standard-library sources under {stdlib} for a split")
    return Corpus(
        train=_as_tokens(b"".join(d for _, d in train)),
        val=_as_tokens(b"".join(d for _, d in val)),
        train_files=tuple(n for n, _ in train),
        val_files=tuple(n for n, _ in val),
    )


def _as_tokens(data: bytes) -> torch.Tensor:
    return torch.frombuffer(bytearray(data), dtype=torch.uint8)


def train_batch(
    tokens: torch.Tensor, *, step: int, batch_size: int, context: int, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Random windows of ``tokens`` (inputs, next-byte targets), a function of (seed, step).

    A fresh generator per step makes the data order independent of how many batches
    were drawn before (resumes, sweeps of different lengths, several optimizers), and a
    data-parallel rank can take its rows ``[rank::world]`` of the same global batch.
    """
    generator = torch.Generator().manual_seed(seed * 1_000_003 + step)
    starts = torch.randint(0, tokens.numel() - context, (batch_size,), generator=generator)
    return _windows(tokens, starts, context)


def val_batch(
    tokens: torch.Tensor, *, n_seqs: int, context: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """``n_seqs`` evenly spaced windows of ``tokens``: a fixed validation set, no randomness."""
    starts = torch.linspace(0, tokens.numel() - context - 1, n_seqs).long()
    return _windows(tokens, starts, context)


def _windows(
    tokens: torch.Tensor, starts: torch.Tensor, context: int
) -> tuple[torch.Tensor, torch.Tensor]:
    index = starts[:, None] + torch.arange(context + 1)
    window = tokens[index].long()
    return window[:, :-1], window[:, 1:]
