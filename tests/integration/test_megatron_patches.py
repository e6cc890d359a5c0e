"""The guards of ``muon_ds.patches.megatron`` and ``megatron_cpu`` (one process, no ranks).

Each runtime patch is run against a megatron-core that is not the one it was written for
(``importlib.metadata.version`` faked) and against one that lacks what it patches (the
attribute removed): it must refuse with a ``PatchError`` naming the range or the
attribute, and leave everything as it was. The entry-point hook and the runner's own
checks are exercised on stand-ins, so no Megatron global is set in this process.
"""

from __future__ import annotations

import argparse
import importlib.metadata
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from muon_ds.megatron.run import EntryHooks, runner_parser
from muon_ds.patches import PatchError, megatron_cpu
from muon_ds.patches import megatron as patches

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def restored(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """Every attribute any patch here may replace is put back after the test, so a guard
    that failed to refuse cannot leave torch or Megatron patched for later tests."""
    import megatron.training
    from megatron.core.datasets import utils
    from megatron.training import arguments, training

    targets = [(owner, name) for owner, name, _ in megatron_cpu._shims()]
    targets += [
        (training, "get_megatron_optimizer"),
        (training, "pretrain"),
        (megatron.training, "pretrain"),
        (arguments, "parse_and_validate_args"),
        (utils, "compile_helpers"),
    ]
    for owner, name in targets:
        monkeypatch.setattr(owner, name, getattr(owner, name))
    return monkeypatch


def _noop(*args: object, **kwargs: object) -> None:
    return None


def _call_hook() -> None:
    patches.hook_entry_point(_noop, _noop, _noop)


def _chunk_without_param_sync() -> SimpleNamespace:
    return SimpleNamespace(bucket_groups=[], expert_parallel_bucket_groups=[])


def _distributed_optimizer() -> type:
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    return DistributedOptimizer


VERSIONED: dict[str, Callable[[], object]] = {
    "install_optimizer_factory": lambda: patches.install_optimizer_factory(_noop),
    "hook_entry_point": _call_hook,
    "use_prebuilt_dataset_helpers": patches.use_prebuilt_dataset_helpers,
    "param_groups_and_buffers": lambda: patches.param_groups_and_buffers([], None, None, False),
    "check_distributed_optimizer": lambda: patches.check_distributed_optimizer(
        _distributed_optimizer()
    ),
    "megatron_cpu.install": megatron_cpu.install,
}


def _snapshot() -> dict[tuple[int, str], object]:
    import megatron.training
    import torch
    from megatron.core.datasets import utils
    from megatron.training import arguments, training

    owners = [
        (torch.cuda, "current_device"),
        (torch, "zeros"),
        (torch.Tensor, "type"),
        (training, "get_megatron_optimizer"),
        (training, "pretrain"),
        (megatron.training, "pretrain"),
        (arguments, "parse_and_validate_args"),
        (utils, "compile_helpers"),
    ]
    return {(id(owner), name): getattr(owner, name, None) for owner, name in owners}


@pytest.mark.parametrize("found", ["0.18.2", "0.20.0"])
@pytest.mark.parametrize("patch", sorted(VERSIONED))
def test_every_megatron_patch_refuses_a_megatron_core_outside_its_range(
    restored, patch, found
) -> None:
    real = importlib.metadata.version

    def version(package: str) -> str:
        return found if package == "megatron-core" else real(package)

    restored.setattr(importlib.metadata, "version", version)
    before = _snapshot()
    with pytest.raises(PatchError, match=rf"megatron-core >= 0\.19\.0, < 0\.20\.0; found {found}"):
        VERSIONED[patch]()
    assert _snapshot() == before


def test_a_missing_megatron_core_is_named(restored) -> None:
    def version(package: str) -> str:
        raise importlib.metadata.PackageNotFoundError(package)

    restored.setattr(importlib.metadata, "version", version)
    with pytest.raises(PatchError, match=r"needs megatron-core .* it is not installed"):
        patches.install_optimizer_factory(_noop)


def _removed(monkeypatch: pytest.MonkeyPatch, target: str) -> None:
    """Delete ``module:attribute`` (or ``module:Class.attribute``) for this test."""
    module_name, path = target.split(":")
    owner: object = importlib.import_module(module_name)
    *owners, name = path.split(".")
    for part in owners:
        owner = getattr(owner, part)
    monkeypatch.delattr(owner, name)


REMOVED = [
    (
        "install_optimizer_factory",
        "megatron.training.training:get_megatron_optimizer",
        "megatron.training.training.get_megatron_optimizer",
    ),
    (
        "hook_entry_point",
        "megatron.training.arguments:parse_and_validate_args",
        "megatron.training.arguments.parse_and_validate_args",
    ),
    (
        "use_prebuilt_dataset_helpers",
        "megatron.core.datasets.utils:compile_helpers",
        "megatron.core.datasets.utils.compile_helpers",
    ),
    (
        "param_groups_and_buffers",
        "megatron.core.optimizer:_get_param_groups_and_buffers",
        "megatron.core.optimizer._get_param_groups_and_buffers",
    ),
    (
        "check_distributed_optimizer",
        "megatron.core.optimizer.distrib_optimizer:"
        "DistributedOptimizer._get_main_param_and_optimizer_states",
        "DistributedOptimizer._get_main_param_and_optimizer_states",
    ),
    (
        "megatron_cpu.install",
        "megatron.core.tensor_parallel.random:CudaRNGStatesTracker.fork",
        "CudaRNGStatesTracker.fork",
    ),
]


@pytest.mark.parametrize(("patch", "target", "named"), REMOVED, ids=[r[0] for r in REMOVED])
def test_every_megatron_patch_refuses_when_what_it_patches_is_gone(
    restored, patch, target, named
) -> None:
    _removed(restored, target)
    before = _snapshot()
    with pytest.raises(PatchError, match=rf"patches {named}, which this version does not have"):
        VERSIONED[patch]()
    # megatron_cpu checks all its shims before replacing any: shim 1 is still torch's own.
    assert _snapshot() == before


def test_cpu_shims_keep_cuda_unavailable_under_torchs_nvml_based_check(restored) -> None:
    """Importing DeepSpeed sets PYTORCH_NVML_BASED_CUDA_CHECK=1 (children inherit it); then
    is_available() is device_count() > 0, which the shims make 1 for Megatron. CUDA must
    still read as unavailable, or torch.compile calls into CUDA on a CPU rank."""
    restored.setenv("PYTORCH_NVML_BASED_CUDA_CHECK", "1")
    restored.setenv("CUDA_DEVICE_MAX_CONNECTIONS", "1")  # install() sets it; undone after
    restored.setattr(megatron_cpu, "_installed", False)
    megatron_cpu.install()
    assert torch.cuda.device_count() == 1
    assert torch.cuda.is_available() is False


def test_param_sync_refuses_a_ddp_without_bucket_group_param_sync() -> None:
    with pytest.raises(PatchError, match=r"\._start_bucket_group_param_sync, which this"):
        patches.start_own_param_sync([_chunk_without_param_sync()], [])


def test_param_sync_starts_only_the_bucket_groups_holding_own_buckets() -> None:
    mine, theirs = object(), object()
    started = []
    chunk = SimpleNamespace(
        bucket_groups=[SimpleNamespace(buckets=[mine]), SimpleNamespace(buckets=[theirs])],
        expert_parallel_bucket_groups=[SimpleNamespace(buckets=[theirs, mine])],
        _start_bucket_group_param_sync=lambda group, force_sync: started.append(
            (group.buckets, force_sync)
        ),
    )
    patches.start_own_param_sync([chunk], [mine])
    assert started == [([mine], False), ([theirs, mine], False)]


def _stand_in_parse(argv: list[str]) -> Callable[..., argparse.Namespace]:
    """``parse_and_validate_args`` without Megatron: only the extra provider's flags."""

    def parse(extra_args_provider=None, ignore_unknown_args=False, args_defaults=None):
        parser = argparse.ArgumentParser(allow_abbrev=False)
        if extra_args_provider is not None:
            parser = extra_args_provider(parser)
        return parser.parse_args(argv)

    return parse


def test_hooked_entry_point_adds_flags_after_the_scripts_and_wraps_pretrain(restored) -> None:
    import megatron.training
    from megatron.training import arguments, training

    restored.setattr(arguments, "parse_and_validate_args", _stand_in_parse(["--a", "--b"]))
    stand_in_pretrain = lambda *args, **kwargs: ("trained", args, kwargs)  # noqa: E731
    restored.setattr(training, "pretrain", stand_in_pretrain)
    restored.setattr(megatron.training, "pretrain", stand_in_pretrain)
    order, parsed, around = [], [], []

    def script_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
        order.append("script")
        parser.add_argument("--a", action="store_true")
        return parser

    def muon_ds_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
        order.append("muon_ds")
        parser.add_argument("--b", action="store_true")
        return parser

    def around_pretrain(call: Callable[[], object]) -> object:
        around.append("before")
        return call()

    patches.hook_entry_point(muon_ds_args, parsed.append, around_pretrain)
    args = arguments.parse_and_validate_args(extra_args_provider=script_args)
    assert order == ["script", "muon_ds"]
    assert parsed == [args]
    assert (args.a, args.b) == (True, True)
    assert megatron.training.pretrain is training.pretrain
    assert training.pretrain(1, model_provider=2) == ("trained", (1,), {"model_provider": 2})
    assert around == ["before"]
    with pytest.raises(PatchError, match="hooked already"):
        patches.hook_entry_point(muon_ds_args, parsed.append, around_pretrain)


def test_runner_refuses_a_script_that_trains_without_the_hooked_parse() -> None:
    with pytest.raises(RuntimeError, match=r"without parsing through .*parse_and_validate_args"):
        EntryHooks(cpu=False).around_pretrain(lambda: None)


def test_runner_cpu_needs_gloo() -> None:
    with pytest.raises(ValueError, match="--cpu: the script needs --distributed-backend gloo"):
        EntryHooks(cpu=True).on_parsed(argparse.Namespace(distributed_backend="nccl"))


def test_runner_options_stop_at_the_script() -> None:
    options = runner_parser().parse_args(
        ["--cpu", "pretrain_gpt.py", "--optimizer", "muon", "--cpu", "-h"]
    )
    assert (options.cpu, options.script) == (True, Path("pretrain_gpt.py"))
    assert options.script_args == ["--optimizer", "muon", "--cpu", "-h"]


def test_the_megatron_lm_diff_uses_what_muon_ds_exports() -> None:
    """``patches/megatron-lm-pretrain_gpt.diff`` cannot be applied here (no Megatron-LM
    source), but the muon_ds names its added lines use must exist and be exported."""
    import muon_ds.megatron

    diff = (ROOT / "patches" / "megatron-lm-pretrain_gpt.diff").read_text()
    added = [line[1:] for line in diff.splitlines() if line.startswith("+") and line[1:2] != "+"]
    (imported,) = [line for line in added if line.startswith("from muon_ds")]
    assert imported.startswith("from muon_ds.megatron import ")
    names = imported.split(" import ")[1].split(", ")
    assert names == ["add_muon_ds_args", "use_muon_ds_from_args"]
    assert set(names) <= set(muon_ds.megatron.__all__)
    body = "\n".join(added)
    assert "add_muon_ds_args(" in body
    assert "use_muon_ds_from_args(args)" in body
