"""Which parameters Muon updates, and as what matrix.

Routing follows Moonlight: a parameter with ndim >= 2 is a Muon matrix unless it is an
embedding or the output head, which stay on AdamW with everything of ndim < 2. A user
overrides that per parameter with the ``muon_ds_route`` attribute, or by name with
``MuonConfig.muon_patterns`` / ``adamw_patterns``.

The attribute is deliberately not called ``use_muon``: DeepSpeed 0.19.8 switches a ZeRO
param group to its own Muon code path when the first param carries a truthy ``use_muon``.
"""

from __future__ import annotations

from fnmatch import fnmatchcase
from typing import Literal

import torch

from muon_ds.config import MuonConfig

Route = Literal["muon", "adamw"]
ROUTE_ATTR = "muon_ds_route"
ROUTES: tuple[Route, ...] = ("muon", "adamw")


def set_route(param: torch.Tensor, route: Route) -> None:
    """Tag ``param`` so muon_ds updates it with ``route`` whatever its name and shape."""
    if route not in ROUTES:
        raise ValueError(f"route={route!r} is not allowed: expected one of {list(ROUTES)}")
    setattr(param, ROUTE_ATTR, route)


def tag_embeddings(model: torch.nn.Module) -> None:
    """Route every ``nn.Embedding`` weight, and any parameter tied to one, to AdamW.

    Finds embeddings by module type rather than by name, so a model whose names do not
    say "embed" (an ``nn.Sequential``) still follows Moonlight's rule. A tied output head
    is the embedding's own tensor and is caught too. Explicit tags are kept.
    """
    for module in model.modules():
        if (
            isinstance(module, torch.nn.Embedding)
            and getattr(module.weight, ROUTE_ATTR, None) is None
        ):
            set_route(module.weight, "adamw")


def route_param(name: str | None, param: torch.Tensor, config: MuonConfig) -> Route:
    """Muon or AdamW for one parameter: its tag, then name patterns, then Moonlight's rule."""
    route = getattr(param, ROUTE_ATTR, None)
    source = f"attribute {ROUTE_ATTR}"
    if route is None and name is not None:
        if any(fnmatchcase(name, p) for p in config.muon_patterns):
            route, source = "muon", "muon_patterns"
        elif any(fnmatchcase(name, p) for p in config.adamw_patterns):
            route, source = "adamw", "adamw_patterns"
    if route is None:
        return "muon" if param.ndim >= 2 else "adamw"
    if route not in ROUTES:
        raise ValueError(
            f"parameter {name or '<unnamed>'}: {source} gives route {route!r}; "
            f"allowed: {list(ROUTES)}"
        )
    if route == "muon" and param.ndim < 2:
        raise ValueError(
            f"parameter {name or '<unnamed>'} of shape {tuple(param.shape)} is routed to Muon "
            f"by {source}, but Muon needs ndim >= 2; route it to 'adamw'"
        )
    return route
