"""Every reach of muon_ds into DeepSpeed's internals, each guarded, written for 0.19.8.

What each function touches (read in DeepSpeed 0.19.8's source):

``allow_under_zero``
    ``deepspeed.runtime.zero.utils.ZERO_SUPPORTED_OPTIMIZERS``: the classes ZeRO wraps
    without ``zero_allow_untested_optimizer``.
``build_from_config``
    ``DeepSpeedEngine._is_supported_optimizer`` (the sanity check that refuses an unknown
    ``"type"``) and ``DeepSpeedEngine._configure_basic_optimizer`` (where the engine builds
    the config's optimizer; it holds ``self.module`` but passes only the parameters).
    Replaces the call-stack lookup muon_ds used before: the builder gets the engine.
``adopt_client_optimizers``
    ``DeepSpeedEngine._configure_optimizer``: where a client optimizer (an instance, or a
    callable's result) becomes the basic optimizer, before ZeRO wraps it; and, once it has,
    the place to reach the ZeRO wrapper.
``record_in_zero_checkpoints``
    One ZeRO wrapper's ``state_dict`` / ``load_state_dict`` (stage 1/2's
    ``DeepSpeedZeroOptimizer``, ``BF16_Optimizer`` and stage 3's
    ``DeepSpeedZeroOptimizer_Stage3`` all load a list of every DP rank's saved dicts) and
    a universal checkpoint's ``zero/optimizer_state.pt``.
``restore_groups_on_zero3_universal_load``
    ``DeepSpeedZeroOptimizer_Stage3.load_hp_checkpoint_state_from_checkpoint_dir_stage3``,
    its inner ``optimizer`` (param groups and state), and the universal checkpoint's
    ``zero/optimizer_state.pt`` (``optimizer_state_dict``'s ``param_groups``).
``muon_ds.patches.deepspeed_zero``
    Reads of what ZeRO sets on the engine and attaches to each parameter.
``skip_shm_op_build``
    ``deepspeed.comm.torch.build_shm_op`` (the CPU accelerator's JIT-built shared-memory op).

Each checks ``DEEPSPEED_RANGE`` and the attributes it touches before touching anything.
The range starts at 0.19.8, the floor ``pyproject.toml`` declares and the only version
read and tested, and stops before 0.20: DeepSpeed changes these private names without
notice, and a new minor release is where it has (its Muon, ``_is_muon_group``, and
``PARAM_ALIGNMENT_PADDINGS`` all arrived within 0.1x minors). Widen it after reading the
patched code in the new version and running tests/integration/test_deepspeed*.py.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import os
from collections.abc import Callable, Iterable
from typing import Any

import torch

from muon_ds.patches import PatchError, require_attribute, require_version

DEEPSPEED_RANGE = ("0.19.8", "0.20.0")
"""``[low, below)`` of the DeepSpeed versions these patches were written for."""

_ORIGINAL = "__muon_ds_original__"
"""Attribute on an installed wrapper holding the function it wraps (makes installs idempotent)."""

Builder = Callable[[Any, list[Any], dict[str, Any]], torch.optim.Optimizer]
"""``build(engine, model_parameters, config_params)`` for a config-named optimizer type."""

_BUILDERS: dict[str, Builder] = {}
_BEFORE_WRAP: list[Callable[[Any, torch.optim.Optimizer], None]] = []
_AFTER_WRAP: list[Callable[[Any], None]] = []


def check_version(patch: str) -> None:
    """The installed DeepSpeed must lie in ``DEEPSPEED_RANGE`` (raises PatchError)."""
    require_version("deepspeed", *DEEPSPEED_RANGE, patch)


def _wrap_once(owner: Any, name: str, patch: str, make: Callable[[Any], Any]) -> None:
    """Replace ``owner.name`` by ``make(original)`` unless a muon_ds wrapper is there."""
    original = require_attribute(owner, name, patch)
    if getattr(original, _ORIGINAL, None) is not None:
        return
    wrapper = functools.wraps(original)(make(original))
    setattr(wrapper, _ORIGINAL, original)
    setattr(owner, name, wrapper)


# -- registration -------------------------------------------------------------------------


def allow_under_zero(optimizer_cls: type[torch.optim.Optimizer]) -> None:
    """Let ZeRO stage 1/2 wrap ``optimizer_cls`` (idempotent)."""
    patch = "muon_ds.patches.deepspeed.allow_under_zero"
    check_version(patch)
    zero_utils = importlib.import_module("deepspeed.runtime.zero.utils")
    supported = require_attribute(zero_utils, "ZERO_SUPPORTED_OPTIMIZERS", patch)
    if optimizer_cls not in supported:
        supported.append(optimizer_cls)


def build_from_config(type_name: str, build: Builder) -> None:
    """Make ``"optimizer": {"type": type_name}`` build through ``build(engine, ...)``.

    DeepSpeed 0.19.8 resolves a type it does not ship with ``getattr(torch.optim, type)``
    and hands the optimizer only the parameters; the builder here also gets the engine,
    so the optimizer sees the module (names, embeddings) and the ZeRO settings.
    A ``type_name`` that lower-cases to one of DeepSpeed's own types is refused: the
    engine lower-cases those and would never reach this builder.
    """
    patch = "muon_ds.patches.deepspeed.build_from_config"
    check_version(patch)
    from deepspeed.runtime.config import DEEPSPEED_OPTIMIZERS
    from deepspeed.runtime.engine import DeepSpeedEngine

    if type_name.lower() in DEEPSPEED_OPTIMIZERS:
        raise ValueError(
            f"optimizer type {type_name!r} lower-cases to DeepSpeed's own {type_name.lower()!r}; "
            "choose a name DeepSpeed does not ship"
        )
    _wrap_once(DeepSpeedEngine, "_is_supported_optimizer", patch, _supported_or_ours)
    _wrap_once(DeepSpeedEngine, "_configure_basic_optimizer", patch, _built_by_ours)
    _BUILDERS[type_name] = build


def _supported_or_ours(original: Callable[..., bool]) -> Callable[..., bool]:
    def is_supported(engine: Any, optimizer_name: str) -> bool:
        return optimizer_name in _BUILDERS or original(engine, optimizer_name)

    return is_supported


def _built_by_ours(original: Callable[..., Any]) -> Callable[..., Any]:
    def configure_basic_optimizer(engine: Any, model_parameters: Any) -> Any:
        build = _BUILDERS.get(engine.optimizer_name())
        if build is None:
            return original(engine, model_parameters)
        return build(engine, list(model_parameters), dict(engine.optimizer_params() or {}))

    return configure_basic_optimizer


def adopt_client_optimizers(
    before_wrap: Callable[[Any, torch.optim.Optimizer], None],
    after_wrap: Callable[[Any], None],
) -> None:
    """Call ``before_wrap(engine, optimizer)`` on every client optimizer before ZeRO wraps
    it, and ``after_wrap(engine)`` once the engine holds its final optimizer.

    A client optimizer is what ``deepspeed.initialize(optimizer=...)`` receives: an
    instance, or a callable DeepSpeed calls with the parameters (its result is checked).
    """
    patch = "muon_ds.patches.deepspeed.adopt_client_optimizers"
    check_version(patch)
    from deepspeed.runtime.engine import DeepSpeedEngine

    _wrap_once(DeepSpeedEngine, "_configure_optimizer", patch, _adopting)
    if before_wrap not in _BEFORE_WRAP:
        _BEFORE_WRAP.append(before_wrap)
    if after_wrap not in _AFTER_WRAP:
        _AFTER_WRAP.append(after_wrap)


def _adopting(original: Callable[..., Any]) -> Callable[..., Any]:
    def configure_optimizer(engine: Any, client_optimizer: Any, model_parameters: Any) -> Any:
        if isinstance(client_optimizer, torch.optim.Optimizer):
            _before_wrap(engine, client_optimizer)
        elif client_optimizer is not None and callable(client_optimizer):
            client_optimizer = _checked_callable(engine, client_optimizer)
        result = original(engine, client_optimizer, model_parameters)
        for hook in _AFTER_WRAP:
            hook(engine)
        return result

    return configure_optimizer


def _before_wrap(engine: Any, optimizer: torch.optim.Optimizer) -> None:
    for hook in _BEFORE_WRAP:
        hook(engine, optimizer)


def _checked_callable(engine: Any, make: Callable[[Any], Any]) -> Callable[[Any], Any]:
    def make_and_check(model_parameters: Any) -> Any:
        optimizer = make(model_parameters)
        if isinstance(optimizer, torch.optim.Optimizer):
            _before_wrap(engine, optimizer)
        return optimizer

    return make_and_check


# -- checkpoints --------------------------------------------------------------------------


def record_in_zero_checkpoints(
    zero_optimizer: Any,
    key: str,
    record: Callable[[], Any],
    check: Callable[[Any], None],
) -> None:
    """Save ``record()`` under ``key`` in every ZeRO checkpoint ``zero_optimizer`` writes,
    and call ``check(saved)`` before it loads one (``None`` if the checkpoint has none).

    Patches this one instance. The check runs before any of DeepSpeed's own checks, on
    the per-rank files (``state_dict_list``, the saved dicts of every DP rank, ``None``
    for others' under a rigid checkpoint) or, for a universal checkpoint, on its
    ``zero/optimizer_state.pt`` (``ds_to_universal`` copies our key there).
    """
    patch = "muon_ds.patches.deepspeed.record_in_zero_checkpoints"
    check_version(patch)
    save = require_attribute(zero_optimizer, "state_dict", patch)
    load = require_attribute(zero_optimizer, "load_state_dict", patch)
    if getattr(load, _ORIGINAL, None) is not None:
        return
    expected = ("state_dict_list", "checkpoint_folder")
    signature = inspect.signature(load)
    found = tuple(signature.parameters)
    if any(name not in found for name in expected):
        raise PatchError(
            f"{patch} expects {type(zero_optimizer).__name__}.load_state_dict to take "
            f"{list(expected)}; this DeepSpeed's takes {list(found)}"
        )

    def state_dict() -> dict[str, Any]:
        saved = save()
        saved[key] = record()
        return saved

    def load_state_dict(*args: Any, **kwargs: Any) -> Any:
        # The wrappers order their arguments differently (BF16_Optimizer: the folder second).
        given = signature.bind(*args, **kwargs).arguments
        check(_saved_record(key, given["state_dict_list"], given.get("checkpoint_folder")))
        return load(*args, **kwargs)

    setattr(load_state_dict, _ORIGINAL, load)
    zero_optimizer.state_dict = state_dict
    zero_optimizer.load_state_dict = load_state_dict


def restore_groups_on_zero3_universal_load(zero_optimizer: Any) -> None:
    """Make a ZeRO-3 universal-checkpoint load restore every param group's own settings.

    DeepSpeed 0.19.8's ``load_hp_checkpoint_state_from_checkpoint_dir_stage3`` copies the
    saved group 0's settings into every group (for muon_ds: group 0's route and weight
    decay into the AdamW and exempt groups), where its stage 1/2 loader restores each
    group from its own saved group; and it stores one step tensor in every sub-group's
    state, which an AdamW step then increments in place once per sub-group. After its
    load, this restores each group from the saved groups (the routing record has already
    checked they are the same groups) and gives each partition its own step. Patches this
    one instance (a ``DeepSpeedZeroOptimizer_Stage3``).
    """
    patch = "muon_ds.patches.deepspeed.restore_groups_on_zero3_universal_load"
    check_version(patch)
    name = "load_hp_checkpoint_state_from_checkpoint_dir_stage3"
    load = require_attribute(zero_optimizer, name, patch)
    if getattr(load, _ORIGINAL, None) is not None:
        return
    inner = require_attribute(zero_optimizer, "optimizer", patch)

    def load_restoring_groups(checkpoint_dir: str) -> Any:
        result = load(checkpoint_dir)
        path = os.path.join(checkpoint_dir, "zero", "optimizer_state.pt")
        saved = torch.load(path, map_location="cpu", weights_only=False)
        saved_groups = saved["optimizer_state_dict"]["param_groups"]
        if len(saved_groups) != len(inner.param_groups):
            raise PatchError(
                f"{patch}: the checkpoint has {len(saved_groups)} param groups, the "
                f"optimizer {len(inner.param_groups)}"
            )
        for group, saved_group in zip(inner.param_groups, saved_groups, strict=True):
            group.update({k: v for k, v in saved_group.items() if k != "params"})
        for state in inner.state.values():
            if torch.is_tensor(state.get("step")):
                state["step"] = state["step"].clone()
        return result

    setattr(load_restoring_groups, _ORIGINAL, load)
    setattr(zero_optimizer, name, load_restoring_groups)


def _saved_record(key: str, state_dict_list: Iterable[Any] | None, folder: str | None) -> Any:
    """``key`` from the first saved dict that has it, or from a universal checkpoint."""
    for saved in state_dict_list or ():
        if isinstance(saved, dict) and key in saved:
            return saved[key]
    if folder:
        path = os.path.join(folder, "zero", "optimizer_state.pt")
        if os.path.isfile(path):
            return torch.load(path, map_location="cpu", weights_only=False).get(key)
    return None


def skip_shm_op_build() -> None:
    """Make DeepSpeed's CPU communication backend use plain gloo collectives.

    DeepSpeed's CPU accelerator JIT-builds a shared-memory all-reduce op when its backend
    starts (minutes on a fresh machine). Tests and CPU benchmarks measure muon_ds, not
    that op. The module comes from ``importlib``: ``import deepspeed.comm.torch as m``
    binds ``deepspeed.comm``'s attribute ``torch`` (the torch package, which it
    re-exports) and would patch nothing.
    """
    patch = "muon_ds.patches.deepspeed.skip_shm_op_build"
    check_version(patch)
    comm_torch = importlib.import_module("deepspeed.comm.torch")
    require_attribute(comm_torch, "build_shm_op", patch)
    comm_torch.build_shm_op = lambda: None


__all__ = [
    "DEEPSPEED_RANGE",
    "adopt_client_optimizers",
    "allow_under_zero",
    "build_from_config",
    "check_version",
    "record_in_zero_checkpoints",
    "restore_groups_on_zero3_universal_load",
    "skip_shm_op_build",
]
