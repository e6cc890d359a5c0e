"""MuonConfig: every knob of muon_ds in one place, with Moonlight's defaults.

The same dataclass is built from a DeepSpeed JSON ``"params"`` dict, from Megatron's
argparse namespace, or directly in Python, and validated once at construction so a bad
value fails before the first step, with a message naming the key, the value and what is
allowed.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from muon_ds.device import NS_DTYPE_BY_NAME

NS_COEFFICIENT_SETS = ("moonlight", "polar_express")
SCALE_MODES = ("moonlight", "keller", "spectral", "none")
NS_DTYPES = ("auto", *NS_DTYPE_BY_NAME)
NS_BACKENDS = ("auto", "torch", "triton")
NS_ALGORITHMS = ("standard", "gram", "auto")


ADAM_KEY_ALIASES = {"betas": "adamw_betas", "eps": "adamw_eps"}
"""DeepSpeed's and Hugging Face's Adam keys -> the MuonConfig keys of the AdamW part."""


class MuonConfigError(ValueError):
    """A MuonConfig key has a value that is not allowed."""


@dataclass(frozen=True)
class MuonConfig:
    """Hyper-parameters of Muon (hidden matrices) and AdamW (everything else)."""

    lr: float = 1e-3
    """Learning rate shared by the Muon and the AdamW parts (Moonlight's point: one lr)."""

    weight_decay: float = 0.1
    """Decoupled weight decay for both parts: ``W <- W * (1 - lr * weight_decay)``."""

    decay_vectors_and_embeddings: bool = True
    """Apply ``weight_decay`` to parameters of ndim < 2 (norm weights, biases) and embedding
    tables too, as Moonlight does (everything decays). ``False`` exempts them, as Hugging
    Face and most GPT recipes do; embeddings are ``nn.Embedding`` weights, found by module
    type when the optimizer is given the model (or tagged by ``muon_ds.tag_embeddings``)."""

    momentum: float = 0.95
    """Muon momentum ``mu`` in ``M <- mu * M + G`` (heavy-ball form, not an EMA)."""

    nesterov: bool = True
    """Orthogonalise ``G + mu * M`` (Nesterov) instead of ``M``."""

    ns_steps: int = 5
    """Newton-Schulz iterations; with ``polar_express`` at most 5 (one triple per step)."""

    ns_coefficients: str = "moonlight"
    """``moonlight``: (3.4445, -4.7750, 2.0315) every step; ``polar_express``: Amsel et al. 2025."""

    ns_dtype: str = "auto"
    """Dtype of the Newton-Schulz iteration and of the exchange's wire. ``auto``: bf16 where
    the device multiplies bf16 natively (CUDA capability 8.0+, a CPU with AMX or AVX-512
    BF16), else fp32 (``muon_ds.device``: bf16 is ~15x slower than fp32 on other CPUs);
    ``bfloat16`` or ``float32`` force one (``float32`` for tight equivalence tests)."""

    ns_eps: float = 1e-7
    """Added to the Frobenius norm before normalising, so a zero matrix gives zeros."""

    ns_backend: str = "auto"
    """``auto``: Triton kernel when Newton-Schulz runs in bf16 on CUDA and triton imports,
    else the torch reference; ``torch``: always the reference; ``triton``: the kernel,
    error if unavailable."""

    ns_algorithm: str = "standard"
    """``standard``: iterate on the matrix; ``gram``: the same polynomial through the short
    side's Gram matrix (``muon_ds.math.gram_newton_schulz``: fewer FLOPs once the long side
    passes 1.5 x the short one); ``auto``: Gram exactly where it takes fewer FLOPs. Either
    runs on the backend ``ns_backend`` picks (the Triton kernels do both)."""

    scale_mode: str = "moonlight"
    """Update scale for an [A, B] matrix: ``moonlight`` 0.2*sqrt(max(A, B)),
    ``keller`` sqrt(max(1, A/B)), ``spectral`` sqrt(max(A, B)), ``none`` 1."""

    adamw_betas: tuple[float, float] = (0.9, 0.95)
    """AdamW (beta1, beta2) for the parameters that are not Muon matrices."""

    adamw_eps: float = 1e-8
    """AdamW epsilon."""

    muon_patterns: tuple[str, ...] = ()
    """fnmatch patterns of parameter names forced to Muon (checked before ``adamw_patterns``)."""

    adamw_patterns: tuple[str, ...] = (
        "*embed*",
        "*wte*",
        "*wpe*",
        "*lm_head*",
        "*output_layer*",
    )
    """fnmatch patterns of parameter names kept on AdamW: Moonlight's embeddings and head."""

    owner_imbalance_limit: float = 1.10
    """Sharded runs: a matrix stays with the rank holding most of it (fewest bytes moved)
    unless that pushes the rank past this max/mean ratio of Newton-Schulz FLOPs."""

    owner_team_max: int = 1
    """Sharded runs: the most ranks of one node that may orthogonalise one matrix together
    (each a block of its long side, ``muon_ds.math.team_newton_schulz``). The planner forms
    a team only for a matrix too large for any one rank to take within
    ``owner_imbalance_limit``: with more ranks than matrices can balance. 1: one owner per
    matrix. Teams run the torch iteration (``ns_algorithm`` "standard") in ``ns_dtype``."""

    team_flops_per_byte: float = 879.0
    """Sharded runs with teams: Newton-Schulz FLOPs a rank does in the time one byte of a
    team collective crosses its node, how the planner weighs a team's traffic against the
    FLOPs it saves. Default: an H100 running Newton-Schulz at 40% of its 989 bf16 TFLOP/s,
    over 450 GB/s of NVLink per GPU."""

    exchange_bucket_mb: float = 64.0
    """Sharded runs: wire MiB per exchange bucket; the next bucket's gather overlaps the
    current bucket's Newton-Schulz, so smaller buckets overlap more but issue more calls."""

    def __post_init__(self) -> None:
        _check_number("lr", self.lr, low=0.0)
        _check_number("weight_decay", self.weight_decay, low=0.0)
        _check_bool("decay_vectors_and_embeddings", self.decay_vectors_and_embeddings)
        _check_number("momentum", self.momentum, low=0.0, high=1.0, high_open=True)
        _check_bool("nesterov", self.nesterov)
        _check_int("ns_steps", self.ns_steps, low=1)
        _check_choice("ns_coefficients", self.ns_coefficients, NS_COEFFICIENT_SETS)
        if self.ns_coefficients == "polar_express" and self.ns_steps > 5:
            raise MuonConfigError(
                f"ns_steps={self.ns_steps} is not allowed with ns_coefficients='polar_express': "
                "that set defines 5 steps, so ns_steps must be 1..5"
            )
        _check_choice("ns_dtype", self.ns_dtype, NS_DTYPES)
        _check_number("ns_eps", self.ns_eps, low=0.0, low_open=True)
        _check_choice("ns_backend", self.ns_backend, NS_BACKENDS)
        _check_choice("ns_algorithm", self.ns_algorithm, NS_ALGORITHMS)
        _check_choice("scale_mode", self.scale_mode, SCALE_MODES)
        betas = self.adamw_betas
        if not (isinstance(betas, (tuple, list)) and len(betas) == 2):
            raise MuonConfigError(
                f"adamw_betas={betas!r} is not allowed: expected two numbers in [0, 1)"
            )
        for i, beta in enumerate(betas):
            _check_number(f"adamw_betas[{i}]", beta, low=0.0, high=1.0, high_open=True)
        object.__setattr__(self, "adamw_betas", (float(betas[0]), float(betas[1])))
        _check_number("adamw_eps", self.adamw_eps, low=0.0, low_open=True)
        _check_number("owner_imbalance_limit", self.owner_imbalance_limit, low=1.0)
        _check_int("owner_team_max", self.owner_team_max, low=1)
        _check_number("team_flops_per_byte", self.team_flops_per_byte, low=0.0)
        _check_number("exchange_bucket_mb", self.exchange_bucket_mb, low=0.0, low_open=True)
        for key in ("muon_patterns", "adamw_patterns"):
            value = getattr(self, key)
            # A str is iterable but is one pattern, not a list; a number or None is not
            # iterable at all and must fail here with the key, not later with a TypeError.
            if not isinstance(value, (list, tuple)) or not all(isinstance(p, str) for p in value):
                raise MuonConfigError(
                    f"{key}={value!r} is not allowed: expected a list of name patterns (strings)"
                )
            object.__setattr__(self, key, tuple(value))

    @classmethod
    def from_dict(cls, params: Mapping[str, Any]) -> MuonConfig:
        """Build from a plain dict (a DeepSpeed JSON ``"params"``); unknown keys are errors.

        DeepSpeed's and Hugging Face's Adam keys ``betas`` and ``eps`` are accepted as
        ``adamw_betas`` and ``adamw_eps`` (``ADAM_KEY_ALIASES``), so HF's DeepSpeed
        template, which fills them from ``TrainingArguments``, works unchanged.
        """
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(params) - known - set(ADAM_KEY_ALIASES))
        if unknown:
            raise MuonConfigError(
                f"unknown MuonConfig key(s) {unknown}; allowed keys: "
                f"{sorted(known | set(ADAM_KEY_ALIASES))}"
            )
        for key, value in params.items():
            if isinstance(value, str) and value == "auto" and key not in _STRING_KEYS:
                raise MuonConfigError(
                    f"{key}='auto' is not allowed here: only Hugging Face's Trainer fills "
                    "'auto' (from TrainingArguments) before DeepSpeed starts; without it, "
                    "give a value"
                )
        values = dict(params)
        for alias, key in ADAM_KEY_ALIASES.items():
            if alias in values:
                if key in values:
                    raise MuonConfigError(
                        f"{alias}={values[alias]!r} and {key}={values[key]!r} are both given; "
                        f"{alias} is DeepSpeed's name for {key}: give one of them"
                    )
                values[key] = values.pop(alias)
        return cls(**values)

    def replace(self, **changes: Any) -> MuonConfig:
        """A copy with some fields changed, validated like a new config."""
        return dataclasses.replace(self, **changes)


_STRING_KEYS = frozenset(f.name for f in dataclasses.fields(MuonConfig) if f.type in ("str", str))
"""Keys whose values are strings, where "auto" may be a real choice (``ns_dtype``)."""


def _check_bool(key: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise MuonConfigError(f"{key}={value!r} is not allowed: expected true or false")


def _check_int(key: str, value: Any, *, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise MuonConfigError(f"{key}={value!r} is not allowed: expected an integer >= {low}")


def _check_number(
    key: str,
    value: Any,
    *,
    low: float,
    high: float = math.inf,
    low_open: bool = False,
    high_open: bool = False,
) -> None:
    # Non-finite values are always rejected, so an infinite bound prints as open: "[0.0, inf)".
    closed_high = not high_open and math.isfinite(high)
    allowed = f"a number in {'(' if low_open else '['}{low}, {high}{']' if closed_high else ')'}"
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise MuonConfigError(f"{key}={value!r} is not allowed: expected {allowed}")
    too_low = value <= low if low_open else value < low
    too_high = value >= high if high_open else value > high
    if too_low or too_high:
        raise MuonConfigError(f"{key}={value!r} is not allowed: expected {allowed}")


def _check_choice(key: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise MuonConfigError(f"{key}={value!r} is not allowed: expected one of {list(choices)}")


__all__ = [
    "ADAM_KEY_ALIASES",
    "NS_ALGORITHMS",
    "NS_BACKENDS",
    "NS_COEFFICIENT_SETS",
    "NS_DTYPES",
    "SCALE_MODES",
    "MuonConfig",
    "MuonConfigError",
]
