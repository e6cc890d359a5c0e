"""Megatron-core adapter: muon_ds inside Megatron's DistributedOptimizer.

``get_muon_ds_optimizer`` replaces ``megatron.core.optimizer.get_megatron_optimizer``
for DDP-wrapped model chunks built with ``use_distributed_optimizer=True``.
"""

from muon_ds.megatron.factory import get_muon_ds_optimizer
from muon_ds.megatron.optimizer import MuonDistributedOptimizer

__all__ = ["MuonDistributedOptimizer", "get_muon_ds_optimizer"]
