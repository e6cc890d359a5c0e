"""Every place muon_ds reaches into Megatron-core's internals (``megatron.core``,
``megatron.training``), each guarded by the version range it was written for.

Written for megatron-core >= 0.19.0, < 0.20.0 (``MEGATRON_CORE``). The lower bound: every
module these patches read or replace (``megatron/core/optimizer/__init__.py`` and
``distrib_optimizer.py``, ``core/distributed/distributed_data_parallel.py``,
``training/training.py``, ``arguments.py``, ``initialize.py``) is byte-identical in 0.19.0
and in 0.19.2, the version muon_ds is tested with, while 0.18.2 differs in all of them
(its ``distrib_optimizer.py`` by some 250 lines; its ``pretrain()`` still took the model
provider positionally). The upper bound: Megatron-LM's main branch (0.20.0 in the making)
changes ``get_megatron_optimizer``'s Adam path, which ``get_muon_ds_optimizer`` mirrors,
and the "fully_reshardable" checkpoint layout ``MuonDistributedOptimizer`` overrides.

The patches import no muon_ds adapter: ``muon_ds.megatron`` hands them its builder and
callbacks. What they touch:

- ``install_optimizer_factory``: ``megatron.training.training.get_megatron_optimizer``,
  the name ``setup_model_and_optimizer`` calls;
- ``hook_entry_point``: ``megatron.training.arguments.parse_and_validate_args`` and
  ``megatron.training.pretrain``, so an entry script that knows nothing of muon_ds gets
  its flags and optimizer (``python -m muon_ds.megatron.run``);
- ``use_prebuilt_dataset_helpers``: ``megatron.core.datasets.utils.compile_helpers``,
  which runs ``make`` where the megatron-core wheel ships no Makefile;
- ``param_groups_and_buffers``: the private ``_get_param_groups_and_buffers`` that
  ``get_megatron_optimizer`` builds its groups with;
- ``check_distributed_optimizer``: the ``DistributedOptimizer`` methods muon_ds's subclass
  overrides or calls, private ones among them;
- ``start_own_param_sync``: DDP's bucket groups and ``_start_bucket_group_param_sync``.

The CUDA stand-ins for CPU runs live apart, in ``muon_ds.patches.megatron_cpu``.
"""

from __future__ import annotations

import argparse
import functools
import importlib
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from muon_ds.patches import PatchError, require_attribute, require_version

MEGATRON_CORE = ("0.19.0", "0.20.0")
"""The megatron-core versions ``[low, below)`` these patches were written for (see above)."""

DISTRIBUTED_OPTIMIZER_HOOKS = (
    "_get_model_param_range_map",
    "_get_main_param_and_optimizer_states",
    "_set_main_param_and_optimizer_states",
    "sharded_param_state_fully_reshardable",
    "load_parameter_state_from_dp_reshardable",
    "load_parameter_state_from_fully_reshardable",
    "start_param_sync_for_bucket_group_subset",
    "prepare_grads",
    "step_with_ready_grads",
)
"""``DistributedOptimizer`` methods ``MuonDistributedOptimizer`` overrides or calls. An
override of a method the base class no longer has would never be called: silently wrong."""

_HOOKED = "__muon_ds_hooked__"


def require_megatron(patch: str) -> None:
    """The installed megatron-core lies in ``MEGATRON_CORE``, else ``PatchError``."""
    require_version("megatron-core", *MEGATRON_CORE, patch=patch)


def install_optimizer_factory(build: Callable[..., Any]) -> None:
    """Make ``megatron.training``'s setup call ``build`` instead of ``get_megatron_optimizer``.

    ``setup_model_and_optimizer`` looks ``get_megatron_optimizer`` up in its module at
    call time, so replacing that one name is the hook; ``build`` takes the same arguments
    (``config, model_chunks, config_overrides=, use_gloo_process_groups=,
    dump_param_to_param_group_map=``).
    """
    patch = "muon_ds.patches.megatron.install_optimizer_factory"
    require_megatron(patch)
    from megatron.training import training

    require_attribute(training, "get_megatron_optimizer", patch)
    require_attribute(training, "setup_model_and_optimizer", patch)
    training.get_megatron_optimizer = build


def hook_entry_point(
    add_args: Callable[[argparse.ArgumentParser], argparse.ArgumentParser],
    on_parsed: Callable[[argparse.Namespace], None],
    around_pretrain: Callable[[Callable[[], Any]], Any],
) -> None:
    """Give an unmodified Megatron entry script muon_ds's flags and a say around training.

    A megatron-core 0.19 entry script (Megatron-LM's ``pretrain_gpt.py``) parses with
    ``parse_and_validate_args(extra_args_provider=...)``, builds its config from the
    parsed args, then calls ``pretrain(...)``. After this hook its parser also gets
    ``add_args`` (after the script's own provider), ``on_parsed(args)`` runs on the
    validated args before the script reads them, and ``pretrain`` runs inside
    ``around_pretrain(call)``. Install before the script imports these names; once per
    process (a second hook would add every flag twice).
    """
    patch = "muon_ds.patches.megatron.hook_entry_point"
    require_megatron(patch)
    import megatron.training
    from megatron.training import arguments, training

    parse = require_attribute(arguments, "parse_and_validate_args", patch)
    pretrain = require_attribute(training, "pretrain", patch)
    if require_attribute(megatron.training, "pretrain", patch) is not pretrain:
        raise PatchError(f"{patch}: megatron.training.pretrain is not training.pretrain")
    if getattr(parse, _HOOKED, False) or getattr(pretrain, _HOOKED, False):
        raise PatchError(f"{patch}: the entry point is hooked already (once per process)")

    @functools.wraps(parse)
    def parse_and_validate_args(
        extra_args_provider: Callable | None = None, *args: Any, **kwargs: Any
    ) -> argparse.Namespace:
        def provider(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
            if extra_args_provider is not None:
                parser = extra_args_provider(parser)
            return add_args(parser)

        parsed = parse(provider, *args, **kwargs)
        on_parsed(parsed)
        return parsed

    @functools.wraps(pretrain)
    def hooked_pretrain(*args: Any, **kwargs: Any) -> Any:
        return around_pretrain(lambda: pretrain(*args, **kwargs))

    for wrapper in (parse_and_validate_args, hooked_pretrain):
        setattr(wrapper, _HOOKED, True)
    arguments.parse_and_validate_args = parse_and_validate_args
    training.pretrain = hooked_pretrain
    megatron.training.pretrain = hooked_pretrain


def use_prebuilt_dataset_helpers() -> bool:
    """Skip ``initialize_megatron``'s ``make`` of the C++ dataset helpers where it cannot
    succeed; True if it was skipped.

    The megatron-core wheel ships the helpers compiled (``helpers_cpp``) but not their
    Makefile, so rank 0's ``make`` fails and exits the job. Where the Makefile is there (a
    Megatron-LM checkout), ``make`` keeps its say (it rebuilds stale helpers) and nothing
    is patched. Without the Makefile the compiled module must import: a clear error
    here, not a failed ``make`` on rank 0 later.
    """
    patch = "muon_ds.patches.megatron.use_prebuilt_dataset_helpers"
    require_megatron(patch)
    from megatron.core.datasets import utils

    require_attribute(utils, "compile_helpers", patch)
    if (Path(utils.__file__).parent / "Makefile").exists():
        return False
    try:
        importlib.import_module("megatron.core.datasets.helpers_cpp")
    except ImportError as error:
        raise PatchError(
            f"{patch}: megatron.core.datasets has neither a Makefile nor compiled helpers "
            f"(helpers_cpp: {error}); reinstall megatron-core"
        ) from None
    utils.compile_helpers = lambda: None
    return True


def param_groups_and_buffers(
    model_chunks: list, config: Any, config_overrides: dict | None, is_expert: bool
) -> tuple[list[dict], dict]:
    """Megatron's param groups and grad buffers of the dense or the expert parameters,
    exactly as ``get_megatron_optimizer`` makes them (private ``_get_param_groups_and_buffers``).
    Collective over the world: Megatron aligns the groups across ranks."""
    patch = "muon_ds.patches.megatron.param_groups_and_buffers"
    require_megatron(patch)
    from megatron.core import optimizer

    build = require_attribute(optimizer, "_get_param_groups_and_buffers", patch)
    return build(
        model_chunks,
        model_chunk_offset=0,
        config=config,
        config_overrides=config_overrides,
        filter_fn=lambda group: group["is_expert_parallel"] == is_expert,
        buffer_name="expert_parallel_buffers" if is_expert else "buffers",
    )


def check_distributed_optimizer(base: type) -> None:
    """``base`` (Megatron's ``DistributedOptimizer``) has every method muon_ds's subclass
    overrides or calls, in a megatron-core of ``MEGATRON_CORE``."""
    patch = "muon_ds.patches.megatron.check_distributed_optimizer"
    require_megatron(patch)
    for name in DISTRIBUTED_OPTIMIZER_HOOKS:
        require_attribute(base, name, patch)


def start_own_param_sync(model_chunks: Iterable[Any], own_buckets: Iterable[Any]) -> None:
    """Start the parameter all-gather of every DDP bucket group holding one of
    ``own_buckets``, once each (DDP's private ``_start_bucket_group_param_sync``).

    Megatron 0.19's ``start_param_sync_for_bucket_group_subset`` walks every bucket
    group of the model, dense and expert alike; with MoE each of the two chained
    distributed optimizers then gathers every parameter.
    """
    patch = "muon_ds.patches.megatron.start_own_param_sync"
    own = {id(bucket) for bucket in own_buckets}
    for chunk in model_chunks:
        dense = require_attribute(chunk, "bucket_groups", patch)
        expert = require_attribute(chunk, "expert_parallel_bucket_groups", patch)
        start = require_attribute(chunk, "_start_bucket_group_param_sync", patch)
        for bucket_group in dense + expert:
            if any(id(bucket) in own for bucket in bucket_group.buckets):
                start(bucket_group, force_sync=False)


__all__ = [
    "DISTRIBUTED_OPTIMIZER_HOOKS",
    "MEGATRON_CORE",
    "check_distributed_optimizer",
    "hook_entry_point",
    "install_optimizer_factory",
    "param_groups_and_buffers",
    "require_megatron",
    "start_own_param_sync",
    "use_prebuilt_dataset_helpers",
]
