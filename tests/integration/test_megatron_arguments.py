"""``--optimizer muon`` through Megatron's own parser and validate_args (one process).

Megatron's ``parse_args`` reads ``sys.argv`` and its ``validate_args`` rewrites muon with
``--use-distributed-optimizer`` into the layer-wise optimizer; these tests run both for
real, then ``muon_config_from_args``; the GPU launcher's flags go through the same
validation at world 8.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

import pytest

from muon_ds import MuonConfig
from muon_ds.megatron import hooks
from muon_ds.megatron.arguments import (
    add_muon_ds_args,
    muon_config_from_args,
    qkv_split_from_args,
    settle_megatron_args,
    tp_mode_from_args,
)

BASE = [
    *("--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4"),
    *("--seq-length", "16", "--max-position-embeddings", "16", "--micro-batch-size", "1"),
    *("--train-iters", "3", "--bf16", "--lr", "1e-3", "--weight-decay", "0.1"),
]
MUON = ["--optimizer", "muon", "--use-distributed-optimizer"]
ROOT = Path(__file__).resolve().parents[2]


def _parse(monkeypatch: pytest.MonkeyPatch, *flags: str) -> argparse.Namespace:
    from megatron.training.arguments import parse_args, validate_args

    monkeypatch.setattr(sys, "argv", ["pretrain_gpt.py", *BASE, *flags])
    args = parse_args(add_muon_ds_args)
    validate_args(args)
    return args


def test_unpassed_muon_flags_take_moonlight_defaults(monkeypatch, capsys) -> None:
    args = _parse(monkeypatch, *MUON)
    capsys.readouterr()
    monkeypatch.setattr(hooks, "use_muon_ds", lambda *_: [])  # not megatron.training's hook
    hooks.use_muon_ds_from_args(args)
    assert muon_config_from_args(args) == MuonConfig(lr=1e-3, weight_decay=0.1)
    assert capsys.readouterr().out.count("muon_ds: effective MuonConfig(") == 1
    # Megatron's code that still reads its flags sees its own defaults, never None.
    assert (args.muon_momentum, args.muon_nesterov, args.adam_beta2) == (0.9, False, 0.999)


def test_passed_megatron_muon_flags_keep_their_meaning(monkeypatch) -> None:
    args = _parse(
        monkeypatch,
        *MUON,
        *("--muon-momentum", "0.9", "--muon-no-nesterov", "--muon-num-ns-steps", "4"),
        *("--muon-coefficient-type", "polar_express", "--muon-fp32-matmul-prec", "high"),
        *("--muon-extra-scale-factor", "1.0", "--adam-beta2", "0.99", "--muon-tp-mode"),
        *("duplicated", "--muon-adamw-patterns", "*router*", "--muon-ns-backend", "torch"),
    )
    assert muon_config_from_args(args) == MuonConfig(
        lr=1e-3,
        weight_decay=0.1,
        momentum=0.9,
        nesterov=False,
        ns_steps=4,
        ns_coefficients="polar_express",
        ns_dtype="float32",
        scale_mode="spectral",
        adamw_betas=(0.9, 0.99),
        adamw_patterns=("*router*",),
        ns_backend="torch",
    )


@pytest.mark.parametrize("algorithm", ["standard", "gram", "auto"])
def test_ns_algorithm_flag_sets_the_config(monkeypatch, algorithm: str) -> None:
    args = _parse(monkeypatch, *MUON, "--muon-ns-algorithm", algorithm)
    assert muon_config_from_args(args).ns_algorithm == algorithm


def test_distributed_optimizer_is_kept_instead_of_the_layer_wise_rewrite(monkeypatch) -> None:
    args = _parse(monkeypatch, *MUON)
    assert (args.use_distributed_optimizer, args.use_layer_wise_distributed_optimizer) == (
        False,
        True,
    ), "Megatron's validate_args rewrite this test undoes"
    settle_megatron_args(args)
    assert (args.use_distributed_optimizer, args.use_layer_wise_distributed_optimizer) == (
        True,
        False,
    )


def test_muon_impl_megatron_leaves_megatrons_muon_untouched(monkeypatch) -> None:
    args = _parse(monkeypatch, *MUON, "--muon-impl", "megatron")
    assert muon_config_from_args(args) is None
    settle_megatron_args(args)
    assert args.use_layer_wise_distributed_optimizer
    assert (args.muon_momentum, args.muon_nesterov, args.muon_tp_mode) == (0.9, False, "blockwise")
    assert (args.muon_coefficient_type, args.muon_extra_scale_factor) == ("quintic", 1.0)


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (("--muon-coefficient-type", "quintic"), "--muon-coefficient-type quintic"),
        (("--muon-scale-mode", "unit_rms_norm"), "--muon-scale-mode unit_rms_norm"),
        (("--muon-extra-scale-factor", "0.5"), "--muon-extra-scale-factor 0.5"),
        (("--muon-scalar-optimizer", "lion"), "--muon-scalar-optimizer lion"),
        (
            ("--muon-ns-dtype", "bfloat16", "--muon-fp32-matmul-prec", "high"),
            "--muon-ns-dtype bfloat16 contradicts --muon-fp32-matmul-prec high",
        ),
    ],
)
def test_megatron_settings_muon_ds_lacks_are_refused_by_flag(monkeypatch, flags, message) -> None:
    args = _parse(monkeypatch, *MUON, *flags)
    with pytest.raises(ValueError, match=f"muon_ds: .*{message}"):
        muon_config_from_args(args)


@pytest.mark.parametrize(
    ("flags", "ns_dtype"),
    [
        ((), "auto"),
        (("--muon-ns-dtype", "float32"), "float32"),
        (("--muon-ns-dtype", "bfloat16"), "bfloat16"),
        (("--muon-fp32-matmul-prec", "medium"), "bfloat16"),
        (("--muon-fp32-matmul-prec", "high", "--muon-ns-dtype", "float32"), "float32"),
    ],
)
def test_ns_dtype_is_auto_unless_a_flag_forces_one(monkeypatch, flags, ns_dtype) -> None:
    args = _parse(monkeypatch, *MUON, *flags)
    assert muon_config_from_args(args).ns_dtype == ns_dtype


def test_muon_ds_without_distributed_optimizer_is_refused(monkeypatch) -> None:
    args = _parse(monkeypatch, "--optimizer", "muon")
    with pytest.raises(ValueError, match="needs --use-distributed-optimizer"):
        muon_config_from_args(args)


@pytest.mark.parametrize(
    ("flags", "mode"),
    [
        ((), "whole"),
        (("--muon-tp-mode", "duplicated"), "whole"),
        (("--muon-tp-mode", "distributed"), "whole"),
        (("--muon-tp-mode", "blockwise"), "blockwise"),
    ],
)
def test_tp_mode_flag_unpassed_is_the_whole_matrix_not_megatrons_blockwise(
    monkeypatch, flags, mode
) -> None:
    args = _parse(monkeypatch, *MUON, *flags)
    assert tp_mode_from_args(args) == mode
    settle_megatron_args(args)  # Megatron's default "blockwise" now fills an unpassed flag
    assert tp_mode_from_args(args) == mode


@pytest.mark.parametrize(
    ("flags", "split"),
    [((), "qkv"), (("--muon-split-qkv-per-head",), "per_head"), (("--muon-no-split-qkv",), "none")],
)
def test_qkv_split_flags(monkeypatch, flags, split) -> None:
    assert qkv_split_from_args(_parse(monkeypatch, *MUON, *flags)) == split


def _gpu_launch_flags(tmp_path: Path, **env: str) -> tuple[list[str], str]:
    """What ``train_gpu.sh`` hands ``pretrain_gpt.py``, and its CUDA_DEVICE_MAX_CONNECTIONS,
    read by running the script with a ``PYTHON`` that records instead of launching."""
    recorder = tmp_path / "python"
    recorder.write_text(
        '#!/usr/bin/env bash\nprintf "%s\\n" "$CUDA_DEVICE_MAX_CONNECTIONS" "$@" > "$RECORD"\n'
    )
    recorder.chmod(0o755)
    record = tmp_path / "argv"
    subprocess.run(
        ["bash", str(ROOT / "launch/megatron/train_gpu.sh")],
        env={**os.environ, **env, "PYTHON": str(recorder), "RECORD": str(record)},
        check=True,
    )
    connections, *argv = record.read_text().splitlines()
    return argv[argv.index("launch.megatron.pretrain_gpt") + 1 :], connections


@pytest.mark.parametrize(
    ("env", "sizes"),
    [({}, (2, 4, 1)), ({"MOE": "1", "TP": "1", "EP": "8"}, (1, 8, 8))],
    ids=["dense_tp2_dp4", "moe_ep8"],
)
def test_gpu_launcher_flags_pass_megatron_and_muon_ds_validation_on_8_gpus(
    tmp_path, monkeypatch, env, sizes
) -> None:
    """train_gpu.sh never runs here (no GPU): its flags go through the entry's own parser
    and Megatron's validate_args at world 8, with the GPU queries answered as an H100's."""
    import torch
    from megatron.training import arguments

    from launch.megatron.pretrain_gpt import add_launch_args
    from muon_ds.testing.tiny_gpt import VOCAB_SIZE

    flags, connections = _gpu_launch_flags(tmp_path, **env)
    monkeypatch.setattr(sys, "argv", ["pretrain_gpt.py", *flags])
    monkeypatch.setenv("WORLD_SIZE", "8")
    monkeypatch.setenv("CUDA_DEVICE_MAX_CONNECTIONS", connections)
    monkeypatch.setattr(arguments, "get_device_arch_version", lambda: 9)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *_: (9, 0))
    args = arguments.parse_args(add_launch_args)
    # What the entry's parse_and_validate_args does, without setting Megatron's globals.
    arguments.validate_args(args, {"tokenizer_type": "NullTokenizer", "vocab_size": VOCAB_SIZE})
    config = muon_config_from_args(args)
    settle_megatron_args(args)
    parallel = (args.tensor_model_parallel_size, args.data_parallel_size)
    assert (*parallel, args.expert_model_parallel_size) == sizes
    assert args.use_distributed_optimizer
    assert args.distributed_backend == "nccl"
    assert config == MuonConfig(lr=2e-3, weight_decay=0.1, adamw_betas=(0.9, 0.95))


def test_owner_team_flags_set_the_config(monkeypatch) -> None:
    args = _parse(
        monkeypatch, *MUON, "--muon-owner-team-max", "8", "--muon-team-flops-per-byte", "500"
    )
    config = muon_config_from_args(args)
    assert (config.owner_team_max, config.team_flops_per_byte) == (8, 500.0)
    assert muon_config_from_args(_parse(monkeypatch, *MUON)).owner_team_max == 1
