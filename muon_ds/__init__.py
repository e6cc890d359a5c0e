"""muon_ds: Moonlight's Muon as a distributed ZeRO-1 optimizer for DeepSpeed and Megatron-core."""

from muon_ds.config import MuonConfig, MuonConfigError
from muon_ds.layout import set_route, tag_embeddings
from muon_ds.muon import Muon
from muon_ds.routing import RoutingReport, routing_report

__version__ = "0.1.0"

__all__ = [
    "Muon",
    "MuonConfig",
    "MuonConfigError",
    "RoutingReport",
    "__version__",
    "routing_report",
    "set_route",
    "tag_embeddings",
]
