"""Put muon_ds into ``megatron.training``: what an entry point calls after parsing.

The reach into Megatron (replacing the optimizer factory ``setup_model_and_optimizer``
calls) is ``muon_ds.patches.megatron.install_optimizer_factory``, version-guarded; this
module hands it muon_ds's factory, as DESIGN.md has adapters hand patches their callbacks.
"""

from __future__ import annotations

import argparse
from typing import Any

from megatron.core.optimizer.optimizer import ChainedOptimizer

from muon_ds.config import MuonConfig
from muon_ds.megatron.arguments import (
    muon_config_from_args,
    qkv_split_from_args,
    settle_megatron_args,
    tp_mode_from_args,
)
from muon_ds.megatron.factory import get_muon_ds_optimizer
from muon_ds.megatron.views import QkvSplit, TpMode
from muon_ds.patches import megatron as patches


def use_muon_ds(
    config: MuonConfig, qkv_split: QkvSplit, tp_mode: TpMode = "whole"
) -> list[ChainedOptimizer]:
    """Make ``megatron.training``'s setup build muon_ds instead of Megatron's optimizer.

    No source is patched. Returns the list every optimizer built from then on is
    appended to, for the closing ``report_muon_ds_work``.
    """
    built: list[ChainedOptimizer] = []

    def build(
        optimizer_config: Any,
        model_chunks: list,
        config_overrides: dict | None = None,
        use_gloo_process_groups: bool = True,
        dump_param_to_param_group_map: str | None = None,
    ) -> ChainedOptimizer:
        if dump_param_to_param_group_map is not None:
            raise NotImplementedError("muon_ds: --dump-param-to-param-group-map")
        optimizer = get_muon_ds_optimizer(
            optimizer_config,
            model_chunks,
            config,
            config_overrides=config_overrides,
            use_gloo_process_groups=use_gloo_process_groups,
            qkv_split=qkv_split,
            tp_mode=tp_mode,
        )
        built.append(optimizer)
        return optimizer

    patches.install_optimizer_factory(build)
    return built


def use_muon_ds_from_args(args: argparse.Namespace) -> list[ChainedOptimizer] | None:
    """What an entry point does between parsing and ``pretrain()``: read the flags, settle
    ``args`` for Megatron (always: it restores Megatron's defaults), log the effective
    config once and, when muon_ds is selected, ``use_muon_ds``; None when it is not."""
    config = muon_config_from_args(args)
    qkv_split, tp_mode = qkv_split_from_args(args), tp_mode_from_args(args)
    settle_megatron_args(args)
    if config is None:
        return None
    if args.rank == 0:  # torch.distributed starts later, in pretrain()
        print(f"muon_ds: effective {config}", flush=True)
    return use_muon_ds(config, qkv_split, tp_mode)


__all__ = ["use_muon_ds", "use_muon_ds_from_args"]
