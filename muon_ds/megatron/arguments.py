"""``--optimizer muon`` on Megatron's command line, backed by muon_ds.

Megatron already defines ``--muon-*`` flags, with defaults that are not Moonlight's
(momentum 0.9, Nesterov off, "quintic" coefficients, extra scale 1.0, blockwise TP).
``add_muon_ds_args`` (an ``extra_args_provider``) keeps those names, adds the knobs they
lack, and clears the defaults of the reused ones so that, after parsing,
``muon_config_from_args`` can tell a flag the user passed from one they did not: the
latter takes Moonlight's default. With ``--muon-impl megatron`` Megatron's own defaults
are put back and nothing else changes.

Reading flags is pure: ``muon_config_from_args``, ``qkv_split_from_args`` and
``tp_mode_from_args`` only read ``args``, in any order. The one write is
``settle_megatron_args``: Megatron's ``validate_args`` rewrites ``--optimizer muon
--use-distributed-optimizer`` into its layer-wise optimizer, which muon_ds undoes (it runs
inside the ordinary, element-wise sharded distributed optimizer), and Megatron's own code
needs its defaults back in the reused flags the user did not pass. Installing muon_ds into
``megatron.training`` is ``muon_ds.megatron.hooks``.
"""

from __future__ import annotations

import argparse
from typing import Any

from muon_ds.config import NS_ALGORITHMS, NS_DTYPES, MuonConfig
from muon_ds.megatron.views import QkvSplit, TpMode

_MEGATRON_DEFAULTS = "muon_ds_megatron_defaults"
"""Where ``add_muon_ds_args`` keeps Megatron's defaults of the flags in ``_REUSED``."""
_UNPASSED = "muon_ds_unpassed"
"""Where ``settle_megatron_args`` records the reused flags it gave Megatron's defaults."""
_REUSED = (
    "muon_momentum",
    "muon_nesterov",
    "muon_scale_mode",
    "muon_extra_scale_factor",
    "muon_fp32_matmul_prec",
    "muon_coefficient_type",
    "muon_num_ns_steps",
    "muon_tp_mode",
    "muon_scalar_optimizer",
    "adam_beta1",
    "adam_beta2",
    "adam_eps",
)
"""Megatron flags muon_ds reads; their defaults are cleared to detect "not passed"."""

_COEFFICIENTS = {"simple": "moonlight", "polar_express": "polar_express"}
"""Megatron's ``--muon-coefficient-type`` names of the sets muon_ds implements."""


def add_muon_ds_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Megatron ``extra_args_provider``: muon_ds's flags, reused flags made detectable."""
    group = parser.add_argument_group("muon_ds")
    group.add_argument(
        "--muon-impl",
        choices=("muon_ds", "megatron"),
        default="muon_ds",
        help="--optimizer muon runs muon_ds (default) or Megatron's own Muon",
    )
    group.add_argument(
        "--muon-no-nesterov",
        action="store_false",
        dest="muon_nesterov",
        help="muon_ds: orthogonalise the momentum, not G + mu M (Nesterov is the default)",
    )
    group.add_argument("--muon-ns-eps", type=float, help="muon_ds: Newton-Schulz norm epsilon")
    group.add_argument(
        "--muon-ns-dtype",
        choices=NS_DTYPES,
        help="muon_ds: Newton-Schulz and exchange dtype (default auto: bf16 where the device "
        "multiplies bf16 natively, else fp32; --muon-fp32-matmul-prec high means float32)",
    )
    group.add_argument(
        "--muon-ns-algorithm",
        choices=NS_ALGORITHMS,
        help="muon_ds: Newton-Schulz on the matrix (standard, the default) or through its "
        "Gram matrix (gram; auto: where that takes fewer FLOPs)",
    )
    group.add_argument(
        "--muon-ns-backend",
        choices=("auto", "torch", "triton"),
        help="muon_ds: Newton-Schulz implementation (auto: Triton for bf16 on CUDA)",
    )
    group.add_argument(
        "--muon-patterns", nargs="*", help="muon_ds: parameter-name patterns forced to Muon"
    )
    group.add_argument(
        "--muon-adamw-patterns",
        nargs="*",
        help="muon_ds: parameter-name patterns kept on AdamW (e.g. '*router*')",
    )
    group.add_argument(
        "--muon-owner-imbalance-limit",
        type=float,
        help="muon_ds: max/mean Newton-Schulz FLOPs per rank before moving a matrix",
    )
    group.add_argument(
        "--muon-owner-team-max",
        type=int,
        help="muon_ds: most ranks of one node that may orthogonalise one matrix together "
        "(default 1: one owner per matrix)",
    )
    group.add_argument(
        "--muon-team-flops-per-byte",
        type=float,
        help="muon_ds: Newton-Schulz FLOPs one byte of team traffic costs as much time as",
    )
    group.add_argument(
        "--muon-exchange-bucket-mb", type=float, help="muon_ds: wire MiB per exchange bucket"
    )
    group.add_argument(
        "--muon-split-qkv-per-head",
        action="store_true",
        help="muon_ds: orthogonalise every attention head on its own instead of Q, K, V",
    )
    megatron_defaults = {dest: parser.get_default(dest) for dest in _REUSED}
    parser.set_defaults(**dict.fromkeys(_REUSED), **{_MEGATRON_DEFAULTS: megatron_defaults})
    return parser


def muon_config_from_args(args: argparse.Namespace) -> MuonConfig | None:
    """The effective MuonConfig when muon_ds is selected, else None (reads ``args`` only).

    Call after ``parse_and_validate_args``: a reused flag the user did not pass takes
    Moonlight's default, not Megatron's.
    """
    if not _selects_muon_ds(args):
        return None
    if not (args.use_distributed_optimizer or args.use_layer_wise_distributed_optimizer):
        raise ValueError("muon_ds: --optimizer muon needs --use-distributed-optimizer")
    return MuonConfig(**_config_fields(_as_passed(args)))


def settle_megatron_args(args: argparse.Namespace) -> None:
    """Write back what Megatron's own code must read: the ordinary distributed optimizer
    when muon_ds is selected, and Megatron's defaults (never None) in the reused flags the
    user did not pass. The readers above keep telling those flags from passed ones."""
    if _selects_muon_ds(args):
        args.use_distributed_optimizer = True
        args.use_layer_wise_distributed_optimizer = False
    unpassed = [dest for dest in _REUSED if getattr(_as_passed(args), dest) is None]
    setattr(args, _UNPASSED, unpassed)
    for dest in unpassed:
        setattr(args, dest, getattr(args, _MEGATRON_DEFAULTS)[dest])


def _selects_muon_ds(args: argparse.Namespace) -> bool:
    return args.optimizer == "muon" and args.muon_impl == "muon_ds"


def _as_passed(args: argparse.Namespace) -> argparse.Namespace:
    """A copy of ``args`` whose reused flags are None where the user did not pass them,
    also after ``settle_megatron_args`` gave them Megatron's defaults."""
    unpassed = getattr(args, _UNPASSED, ())
    return argparse.Namespace(**{**vars(args), **dict.fromkeys(unpassed)})


def qkv_split_from_args(args: argparse.Namespace) -> QkvSplit:
    """``--muon-no-split-qkv`` keeps QKV whole; ``--muon-split-qkv-per-head`` cuts heads."""
    if not args.muon_split_qkv:
        return "none"
    return "per_head" if args.muon_split_qkv_per_head else "qkv"


def _config_fields(args: argparse.Namespace) -> dict[str, Any]:
    """MuonConfig fields from the flags the user passed; the others keep their defaults."""
    _refuse(args)
    fields: dict[str, Any] = {"lr": args.lr, "weight_decay": args.weight_decay}
    direct = {
        "momentum": args.muon_momentum,
        "nesterov": args.muon_nesterov,
        "ns_steps": args.muon_num_ns_steps,
        "ns_eps": args.muon_ns_eps,
        "ns_backend": args.muon_ns_backend,
        "ns_algorithm": args.muon_ns_algorithm,
        "adamw_eps": args.adam_eps,
        "muon_patterns": args.muon_patterns,
        "adamw_patterns": args.muon_adamw_patterns,
        "owner_imbalance_limit": args.muon_owner_imbalance_limit,
        "owner_team_max": args.muon_owner_team_max,
        "team_flops_per_byte": args.muon_team_flops_per_byte,
        "exchange_bucket_mb": args.muon_exchange_bucket_mb,
    }
    fields.update({k: v for k, v in direct.items() if v is not None})
    if args.muon_coefficient_type is not None:
        fields["ns_coefficients"] = _COEFFICIENTS[args.muon_coefficient_type]
    if args.muon_fp32_matmul_prec is not None:
        fields["ns_dtype"] = _matmul_prec_dtype(args.muon_fp32_matmul_prec)
    if args.muon_ns_dtype is not None:
        fields["ns_dtype"] = args.muon_ns_dtype
    if args.muon_extra_scale_factor == 1.0:
        fields["scale_mode"] = "spectral"
    if args.adam_beta1 is not None or args.adam_beta2 is not None:
        default = MuonConfig().adamw_betas
        fields["adamw_betas"] = (
            default[0] if args.adam_beta1 is None else args.adam_beta1,
            default[1] if args.adam_beta2 is None else args.adam_beta2,
        )
    return fields


def _matmul_prec_dtype(prec: str) -> str:
    """Megatron's ``--muon-fp32-matmul-prec`` as a forced ``ns_dtype``: ``high`` keeps fp32
    products, ``medium`` and ``low`` allow bf16 ones."""
    return "float32" if prec == "high" else "bfloat16"


def _refuse(args: argparse.Namespace) -> None:
    """Megatron settings muon_ds does not implement: say so instead of ignoring them."""
    checks: list[tuple[bool, str]] = [
        (
            args.muon_coefficient_type not in (None, *_COEFFICIENTS),
            f"--muon-coefficient-type {args.muon_coefficient_type}: muon_ds implements "
            f"{sorted(_COEFFICIENTS)} ('simple' is Moonlight's)",
        ),
        (
            args.muon_scale_mode not in (None, "spectral"),
            f"--muon-scale-mode {args.muon_scale_mode}: muon_ds scales spectrally, "
            "sqrt(max(A, B)) x --muon-extra-scale-factor",
        ),
        (
            args.muon_extra_scale_factor not in (None, 0.2, 1.0),
            f"--muon-extra-scale-factor {args.muon_extra_scale_factor}: muon_ds supports "
            "0.2 (Moonlight, the default) and 1.0",
        ),
        (
            args.muon_ns_dtype is not None
            and args.muon_fp32_matmul_prec is not None
            and args.muon_ns_dtype != _matmul_prec_dtype(args.muon_fp32_matmul_prec),
            f"--muon-ns-dtype {args.muon_ns_dtype} contradicts --muon-fp32-matmul-prec "
            f"{args.muon_fp32_matmul_prec}; pass one of them",
        ),
        (
            args.muon_scalar_optimizer not in (None, "adam"),
            f"--muon-scalar-optimizer {args.muon_scalar_optimizer}: muon_ds uses AdamW",
        ),
    ]
    problems = [message for failed, message in checks if failed]
    if problems:
        raise ValueError("muon_ds: " + "; ".join(problems))


def tp_mode_from_args(args: argparse.Namespace) -> TpMode:
    """``--muon-tp-mode blockwise``: each TP rank's block alone. Unpassed, ``duplicated``
    or ``distributed``: the whole logical matrix, once (what those two modes compute,
    without their repeated or distributed Newton-Schulz)."""
    return "blockwise" if _as_passed(args).muon_tp_mode == "blockwise" else "whole"


__all__ = [
    "add_muon_ds_args",
    "muon_config_from_args",
    "qkv_split_from_args",
    "settle_megatron_args",
    "tp_mode_from_args",
]
