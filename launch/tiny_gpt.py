"""A tiny GPT, an embedded byte-level corpus and a training loop, for demos and tests.

Nothing is downloaded: the corpus is Python's own standard library, read from the
interpreter's install. Everything here is a pure function or a small class with no
global state, so the single-process demo, the tests and a multi-rank launcher share it:
batches are a function of ``(seed, step)`` alone, so every optimizer (and every rank)
sees the same data in the same order, and a rank can take its rows of the global batch.
"""

from __future__ import annotations

import math
import sysconfig
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

VOCAB_SIZE = 256
"""Byte-level tokens: every byte is a token, so any text is covered without a tokenizer."""


@dataclass(frozen=True)
class GPTConfig:
    """Shape of the tiny GPT."""

    context: int = 64
    """Tokens per sequence (bytes: a line or two of code, which keeps a CPU step cheap);
    also the number of learned positions."""

    d_model: int = 128
    """Width of the residual stream."""

    n_layers: int = 4
    """Number of transformer blocks."""

    n_heads: int = 4
    """Attention heads per block; must divide ``d_model``."""

    mlp_ratio: int = 4
    """Hidden width of the MLP as a multiple of ``d_model``."""

    def __post_init__(self) -> None:
        if self.d_model % self.n_heads:
            raise ValueError(f"n_heads={self.n_heads} must divide d_model={self.d_model}")


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention.

    Q, K and V are separate ``[d, d]`` projections rather than one fused ``[3d, d]``:
    Muon orthogonalises each weight as a whole, and Q, K, V are three logical matrices.
    """

    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.n_heads = cfg.n_heads
        self.q = nn.Linear(cfg.d_model, cfg.d_model, bias=False)
        self.k = nn.Linear(cfg.d_model, cfg.d_model, bias=False)
        self.v = nn.Linear(cfg.d_model, cfg.d_model, bias=False)
        self.out = nn.Linear(cfg.d_model, cfg.d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, seq, width = x.shape
        q, k, v = (
            proj(x).view(batch, seq, self.n_heads, width // self.n_heads).transpose(1, 2)
            for proj in (self.q, self.k, self.v)
        )
        y = nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.out(y.transpose(1, 2).reshape(batch, seq, width))


class Block(nn.Module):
    """Pre-LN transformer block: ``x + attn(ln(x))``, then ``x + mlp(ln(x))``."""

    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        hidden = cfg.mlp_ratio * cfg.d_model
        self.ln_attn = nn.LayerNorm(cfg.d_model)
        self.attn = CausalSelfAttention(cfg)
        self.ln_mlp = nn.LayerNorm(cfg.d_model)
        self.mlp = nn.Sequential(
            nn.Linear(cfg.d_model, hidden, bias=False),
            nn.GELU(),
            nn.Linear(hidden, cfg.d_model, bias=False),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_attn(x))
        return x + self.mlp(self.ln_mlp(x))


class TinyGPT(nn.Module):
    """Decoder-only byte-level GPT with learned positions and an untied head.

    Module names are chosen for muon_ds's routing: ``tok_embed`` / ``pos_embed`` and
    ``lm_head`` match its default AdamW name patterns, every other matrix goes to Muon.
    """

    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.tok_embed = nn.Embedding(VOCAB_SIZE, cfg.d_model)
        self.pos_embed = nn.Embedding(cfg.context, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.ln_final = nn.LayerNorm(cfg.d_model)
        self.lm_head = nn.Linear(cfg.d_model, VOCAB_SIZE, bias=False)
        self._init_weights()

    def _init_weights(self) -> None:
        """GPT-2's init: N(0, 0.02), residual output projections shrunk by sqrt(2 L).

        The small head makes the initial loss close to ln(256), a uniform guess.
        """
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=0.02)
        for block in self.blocks:
            for proj in (block.attn.out, block.mlp[2]):
                nn.init.normal_(proj.weight, std=0.02 / math.sqrt(2 * self.cfg.n_layers))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """Logits ``[batch, seq, 256]`` for int64 tokens ``[batch, seq]``, seq <= context."""
        positions = torch.arange(tokens.size(1), device=tokens.device)
        x = self.tok_embed(tokens) + self.pos_embed(positions)
        for block in self.blocks:
            x = block(x)
        return self.lm_head(self.ln_final(x))


def init_model(cfg: GPTConfig, seed: int) -> TinyGPT:
    """A ``TinyGPT`` whose weights depend on ``seed`` only (the global RNG is left as it was)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return TinyGPT(cfg)


def lm_loss(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean next-byte cross-entropy in nats per byte."""
    logits = model(inputs)
    return nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten())


# --- corpus ------------------------------------------------------------------------------


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


# --- training ----------------------------------------------------------------------------


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
