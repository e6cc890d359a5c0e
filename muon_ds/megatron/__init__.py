"""Megatron-core adapter: muon_ds inside Megatron's DistributedOptimizer.

An entry script adds ``add_muon_ds_args`` to its parser and calls
``use_muon_ds_from_args(args)`` after parsing; ``get_muon_ds_optimizer`` replaces
``megatron.core.optimizer.get_megatron_optimizer`` for DDP-wrapped model chunks built with
``use_distributed_optimizer=True``.
"""

from muon_ds.megatron.arguments import add_muon_ds_args
from muon_ds.megatron.factory import get_muon_ds_optimizer
from muon_ds.megatron.hooks import use_muon_ds, use_muon_ds_from_args
from muon_ds.megatron.optimizer import MuonDistributedOptimizer

__all__ = [
    "MuonDistributedOptimizer",
    "add_muon_ds_args",
    "get_muon_ds_optimizer",
    "use_muon_ds",
    "use_muon_ds_from_args",
]
