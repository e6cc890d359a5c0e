"""Which parameters Muon updates, and as what matrix.

Routing follows Moonlight: a parameter with ndim >= 2 is a Muon matrix unless it is an
embedding or the output head, which stay on AdamW with everything of ndim < 2. A user
overrides that per parameter with the ``muon_ds_route`` attribute, or by name with
``MuonConfig.muon_patterns`` / ``adamw_patterns``.

The attribute is deliberately not called ``use_muon``: DeepSpeed 0.19.8 switches a ZeRO
param group to its own Muon code path when the first param carries a truthy ``use_muon``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from fnmatch import fnmatchcase
from typing import Any, Literal

import torch

from muon_ds.config import MuonConfig

Route = Literal["muon", "adamw"]
ROUTE_ATTR = "muon_ds_route"
ROUTES: tuple[Route, ...] = ("muon", "adamw")
EMBEDDING_ATTR = "muon_ds_embedding"
"""Set (True) by ``tag_embeddings`` on every ``nn.Embedding`` weight, whatever its route:
what ``MuonConfig.decay_vectors_and_embeddings`` calls an embedding."""

GroupKey = tuple[Route, bool]
"""How a parameter is grouped: its route, and whether weight decay applies to it."""
GROUP_KEYS: tuple[GroupKey, ...] = (
    ("muon", True),
    ("muon", False),
    ("adamw", True),
    ("adamw", False),
)
"""Order in which a user group's split groups are laid out (decayed before exempt)."""


def set_route(param: torch.Tensor, route: Route) -> None:
    """Tag ``param`` so muon_ds updates it with ``route`` whatever its name and shape."""
    if route not in ROUTES:
        raise ValueError(f"route={route!r} is not allowed: expected one of {list(ROUTES)}")
    setattr(param, ROUTE_ATTR, route)


def tag_embeddings(model: torch.nn.Module) -> None:
    """Route every ``nn.Embedding`` weight, and any parameter tied to one, to AdamW.

    Finds embeddings by module type rather than by name, so a model whose names do not
    say "embed" (an ``nn.Sequential``) still follows Moonlight's rule. A tied output head
    is the embedding's own tensor and is caught too. Explicit tags are kept; every
    embedding weight is also marked (``EMBEDDING_ATTR``) for the weight-decay exemption.
    """
    for module in model.modules():
        if isinstance(module, torch.nn.Embedding):
            setattr(module.weight, EMBEDDING_ATTR, True)
            if getattr(module.weight, ROUTE_ATTR, None) is None:
                set_route(module.weight, "adamw")


def route_param(
    name: str | None,
    param: torch.Tensor,
    config: MuonConfig,
    shape: Sequence[int] | None = None,
) -> Route:
    """Muon or AdamW for one parameter: its tag, then name patterns, then Moonlight's rule.

    ``shape``: the parameter's full shape where ``param.shape`` is not it (ZeRO-3 empties
    a partitioned parameter's data); ``param.shape`` otherwise.
    """
    shape = tuple(param.shape if shape is None else shape)
    route = getattr(param, ROUTE_ATTR, None)
    source = f"attribute {ROUTE_ATTR}"
    if route is None and name is not None:
        if any(fnmatchcase(name, p) for p in config.muon_patterns):
            route, source = "muon", "muon_patterns"
        elif any(fnmatchcase(name, p) for p in config.adamw_patterns):
            route, source = "adamw", "adamw_patterns"
    if route is None and len(shape) < 2:
        return "adamw"  # Muon cannot take a vector: shape alone decides
    if route is None and name is None:
        raise ValueError(
            f"an unnamed parameter of shape {shape} has no route: shape alone "
            "cannot tell a hidden matrix from an embedding or the output head (Moonlight "
            "sends those to AdamW). Pass the model (muon_ds.Muon(model)) or "
            "model.named_parameters(), or tag it with muon_ds.set_route(param, 'muon' or "
            "'adamw')"
        )
    if route is None:
        return "muon"
    if route not in ROUTES:
        raise ValueError(
            f"parameter {name or '<unnamed>'}: {source} gives route {route!r}; "
            f"allowed: {list(ROUTES)}"
        )
    if route == "muon" and len(shape) < 2:
        raise ValueError(
            f"parameter {name or '<unnamed>'} of shape {shape} is routed to Muon "
            f"by {source}, but Muon needs ndim >= 2; route it to 'adamw'"
        )
    return route


def decays(param: torch.Tensor, config: MuonConfig, shape: Sequence[int] | None = None) -> bool:
    """Whether weight decay applies to ``param`` (of ``shape``, as in ``route_param``):
    always, unless the config exempts ndim < 2 parameters and embeddings
    (``decay_vectors_and_embeddings=False``)."""
    if config.decay_vectors_and_embeddings:
        return True
    ndim = param.ndim if shape is None else len(shape)
    return not (ndim < 2 or getattr(param, EMBEDDING_ATTR, False))


def group_key(
    name: str | None,
    param: torch.Tensor,
    config: MuonConfig,
    shape: Sequence[int] | None = None,
) -> GroupKey:
    """The split group ``param`` (of ``shape``, as in ``route_param``) joins: its route
    and whether it decays."""
    return route_param(name, param, config, shape), decays(param, config, shape)


def split_group_settings(key: GroupKey) -> dict[str, object]:
    """What a split group overrides in its user group's settings: an exempt group's
    weight decay is 0, whatever the user group says."""
    return {} if key[1] else {"weight_decay": 0.0}


def split_param_group(
    group: Mapping[str, Any],
    key_of: Callable[[Any], GroupKey],
    keys: Sequence[GroupKey] = GROUP_KEYS,
    keep_empty: bool = False,
) -> list[dict[str, Any]]:
    """One user param group as one group per split key (route, decays), in ``keys`` order.

    Each keeps the user group's settings, overridden by ``split_group_settings``, and is
    marked ``"algorithm"``; every optimizer and adapter splits its groups this way, so a
    group holds one algorithm's parameters. ``key_of`` gets each member as given (a
    tensor or a ``(name, tensor)`` pair); empty groups are dropped unless ``keep_empty``.
    """
    split: dict[GroupKey, list[Any]] = {key: [] for key in keys}
    for member in group["params"]:
        split[key_of(member)].append(member)
    settings = {k: v for k, v in group.items() if k != "params"}
    return [
        {**settings, **split_group_settings(key), "params": members, "algorithm": key[0]}
        for key, members in split.items()
        if members or keep_empty
    ]


@dataclass(frozen=True)
class TensorParallel:
    """How one parameter is split over a tensor-parallel group.

    ``dim`` is the dim of the parameter's 2-D matrix view that is split: 0 for a
    column-parallel weight (each rank holds some output rows), 1 for a row-parallel one
    (each rank holds some input columns). ``size == 1`` means not split.
    """

    rank: int = 0
    size: int = 1
    dim: int = 0


NOT_SPLIT = TensorParallel()


@dataclass(frozen=True)
class RowBlock:
    """Rows ``[start, end)`` of a TP-local 2-D weight that belong to logical matrix ``key``.

    A fused parameter (interleaved QKV, gated fc1, grouped experts) is several logical
    matrices; each is the union of its blocks. Blocks with the same key on different TP
    ranks are one matrix, stacked along the TP dim. Newton-Schulz commutes with row and
    column permutations, so the order blocks are stacked in never changes the result.
    """

    key: int
    start: int
    end: int


@dataclass(frozen=True)
class ShardView:
    """What one rank holds of one parameter in its ZeRO-1 shard.

    ZeRO-1 shards flat buffers evenly and element-wise, so a rank holds one contiguous
    range ``[start, end)`` of the parameter's TP-local tensor, flattened; those elements
    live at ``offset`` in optimizer buffer ``buffer``. ``matrix_shape`` is the 2-D view
    of the TP-local tensor the blocks refer to, in the tensor's own flat order: ``[out,
    in*k*k]`` for a conv kernel, ``[E*rows, cols]`` for 3-D grouped experts.

    Every rank of the exchange group describes a parameter with the same ``name``,
    ``matrix_shape``, TP size and dim; ``start``/``end``, ``tp.rank``, the buffer location
    (and, for per-head keys, ``blocks``) differ by rank.
    """

    name: str
    matrix_shape: tuple[int, int]
    start: int
    end: int
    buffer: int
    offset: int
    route: Route = "muon"
    tp: TensorParallel = NOT_SPLIT
    blocks: tuple[RowBlock, ...] = ()
    group: str = "dense"

    @property
    def numel(self) -> int:
        return self.end - self.start

    def matrix_blocks(self) -> tuple[RowBlock, ...]:
        """The explicit blocks; an empty ``blocks`` means one matrix, the whole weight."""
        return self.blocks or (RowBlock(0, 0, self.matrix_shape[0]),)


def expert_blocks(
    local_rows: int, num_experts: int, first_expert: int = 0, *, gated: bool = False
) -> tuple[RowBlock, ...]:
    """Grouped expert weights (``[E * rows, cols]`` or ``[E, rows, cols]``): one matrix each.

    Keys are global expert indices (``first_expert`` + local index), so experts held by
    different expert-parallel ranks never merge. A ``gated`` fc1 holds ``[gate; up]`` per
    expert: two matrices each, keys ``2 * expert`` (gate) and ``2 * expert + 1`` (up).
    """
    if num_experts < 1 or local_rows % num_experts:
        raise ValueError(f"{local_rows} rows cannot be split into {num_experts} experts")
    rows = local_rows // num_experts
    per_expert = gated_blocks(rows) if gated else (RowBlock(0, 0, rows),)
    return tuple(
        RowBlock(
            len(per_expert) * (first_expert + e) + block.key,
            e * rows + block.start,
            e * rows + block.end,
        )
        for e in range(num_experts)
        for block in per_expert
    )


def gated_blocks(local_rows: int) -> tuple[RowBlock, ...]:
    """Gated MLP fc1 stored as ``[gate; up]`` on each TP rank: gate and up are two matrices."""
    if local_rows % 2:
        raise ValueError(f"a gated fc1 needs an even number of rows, got {local_rows}")
    half = local_rows // 2
    return (RowBlock(0, 0, half), RowBlock(1, half, local_rows))


def qkv_blocks(
    local_query_groups: int,
    heads_per_group: int,
    head_dim: int,
    *,
    per_head: bool = False,
    tp: TensorParallel = NOT_SPLIT,
) -> tuple[RowBlock, ...]:
    """Interleaved QKV (per query group: its query heads, then one K and one V head).

    By default Q, K and V are three matrices (keys 0, 1, 2) gathered over all groups and
    TP ranks. ``per_head`` makes every head its own matrix; keys are then global head
    indices so heads held by different TP ranks stay apart.
    """
    blocks = []
    group_rows = (heads_per_group + 2) * head_dim
    heads_per_rank = local_query_groups * (heads_per_group + 2)
    for g in range(local_query_groups):
        base = g * group_rows
        if not per_head:
            q_end = base + heads_per_group * head_dim
            blocks += [
                RowBlock(0, base, q_end),
                RowBlock(1, q_end, q_end + head_dim),
                RowBlock(2, q_end + head_dim, base + group_rows),
            ]
            continue
        for h in range(heads_per_group + 2):
            key = tp.rank * heads_per_rank + g * (heads_per_group + 2) + h
            blocks.append(RowBlock(key, base + h * head_dim, base + (h + 1) * head_dim))
    return tuple(blocks)
