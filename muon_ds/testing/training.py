"""The demo's training loop: one schedule, one decay convention, any optimizer.

Every optimizer in a comparison gets the same model init, batches, lr schedule and decay
groups, so they differ only in the update rule.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from muon_ds.testing.corpus import Corpus, train_batch
from muon_ds.testing.tiny_gpt import GPTConfig, init_model, lm_loss


def lr_factor(
    step: int, *, total_steps: int, warmup_steps: int, final_fraction: float = 0.1
) -> float:
    """Multiplier of the peak lr at ``step``: linear warmup, then cosine to ``final_fraction``.

    The same schedule drives every optimizer, so they differ only in the update rule.
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return final_fraction + (1 - final_fraction) * 0.5 * (1 + math.cos(math.pi * progress))


def decay_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Named parameter groups: ``weight_decay`` on matrices, none on gains and biases.

    Named, so muon_ds can route embeddings and the head by name; every optimizer in a
    comparison gets these same groups, so the decay convention is the same for all.
    """
    named = list(model.named_parameters())
    return [
        {"params": [(n, p) for n, p in named if p.ndim >= 2], "weight_decay": weight_decay},
        {"params": [(n, p) for n, p in named if p.ndim < 2], "weight_decay": 0.0},
    ]


@torch.no_grad()
def evaluate(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor], chunk: int = 32) -> float:
    """Mean loss over a fixed batch, in chunks of ``chunk`` sequences to bound memory."""
    was_training = model.training
    model.eval()
    inputs, targets = batch
    total = sum(
        lm_loss(model, inputs[i : i + chunk], targets[i : i + chunk]).item()
        * inputs[i : i + chunk].size(0)
        for i in range(0, inputs.size(0), chunk)
    )
    model.train(was_training)
    return total / inputs.size(0)


OptimizerFactory = Callable[[nn.Module, float], torch.optim.Optimizer]
"""Builds an optimizer for ``model`` at peak lr ``lr``."""


@dataclass(frozen=True)
class TrainConfig:
    """One training run."""

    steps: int
    """Optimizer steps."""

    lr: float
    """Peak learning rate, reached after warmup."""

    batch_size: int = 32
    """Sequences per step."""

    warmup_steps: int = 20
    """Steps of linear warmup before the cosine decay."""

    eval_every: int = 10
    """Evaluate the validation loss every this many steps (and at step 0 and the end)."""

    seed: int = 0
    """Seeds the model init and the batch order."""


@dataclass(frozen=True)
class EvalPoint:
    """Losses after ``step`` optimizer steps."""

    step: int
    """Optimizer steps taken."""

    train_loss: float
    """Mean training loss of the steps since the previous point (NaN at step 0)."""

    val_loss: float
    """Loss on the fixed validation batch."""


def train(
    model_cfg: GPTConfig,
    run: TrainConfig,
    corpus: Corpus,
    make_optimizer: OptimizerFactory,
    val: tuple[torch.Tensor, torch.Tensor],
    progress: Callable[[int, float], None] | None = None,
) -> list[EvalPoint]:
    """Train a fresh ``TinyGPT`` and return its loss curve.

    The model is initialised from ``run.seed`` alone, so runs that differ only in the
    optimizer start from the same weights and see the same batches. ``progress`` is
    called after every step with (step, train loss). A non-finite loss ends the run
    early (a diverged lr in a sweep), recorded as a last point with an infinite loss.
    """
    model = init_model(model_cfg, run.seed)
    optimizer = make_optimizer(model, run.lr)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda s: lr_factor(s, total_steps=run.steps, warmup_steps=run.warmup_steps),
    )
    points = [EvalPoint(0, math.nan, evaluate(model, val))]
    window: list[float] = []  # training losses since the last evaluation
    for step in range(1, run.steps + 1):
        inputs, targets = train_batch(
            corpus.train,
            step=step - 1,
            batch_size=run.batch_size,
            context=model_cfg.context,
            seed=run.seed,
        )
        loss = lm_loss(model, inputs, targets)
        window.append(loss.item())
        if not math.isfinite(window[-1]):
            points.append(EvalPoint(step, math.inf, math.inf))
            break
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        if progress is not None:
            progress(step, window[-1])
        if step % run.eval_every == 0 or step == run.steps:
            points.append(EvalPoint(step, sum(window) / len(window), evaluate(model, val)))
            window.clear()
    return points
