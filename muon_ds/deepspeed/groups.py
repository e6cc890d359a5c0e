"""Parameter names and the split of user groups into Muon and AdamW halves.

Routing reads each parameter's full shape (``ds_shape`` where ``zero.Init`` has already
partitioned it and emptied its data).

ZeRO flattens each param group into one partition, so each half becomes a buffer that is
wholly Muon (fp32 momentum, 4 bytes/element) or wholly AdamW (8 bytes/element).
"""

from __future__ import annotations

from typing import Any

import torch

from muon_ds.config import MuonConfig
from muon_ds.deepspeed.support import UnsupportedDeepSpeedSetupError
from muon_ds.layout import group_key, split_param_group, tag_embeddings
from muon_ds.patches import deepspeed_zero as zero

GROUP_KEY = "muon_ds_group"
"""Param-group key naming which split half a group is (a plain int, saved by torch)."""

NAMES_SHOWN = 6
"""How many parameter names an error lists before "..."."""


def named_groups(
    params: Any, model: torch.nn.Module | None
) -> tuple[list[dict[str, Any]], dict[int, str]]:
    """User param groups of tensors, and every parameter's name (by ``id``).

    Names come from the model (which also marks its embeddings by module type) or from
    ``(name, tensor)`` pairs. Routing by shape alone would send embeddings and the output
    head to Muon without a word, so any parameter without a name is refused.
    """
    if isinstance(params, torch.nn.Module):
        if model is not None and model is not params:
            raise ValueError("MuonDS got a model as params and another as model=; pass one")
        model = params
        params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    items = list(params)
    if not items:
        raise ValueError("MuonDS got an empty parameter list")
    names: dict[int, str] = {}
    if model is not None:
        tag_embeddings(model)
        names = {id(p): n for n, p in model.named_parameters()}
    user_groups = items if isinstance(items[0], dict) else [{"params": items}]
    groups, unnamed = [], []
    for user_group in user_groups:
        members = user_group["params"]
        members = [members] if isinstance(members, torch.Tensor) else list(members)
        tensors = []
        for member in members:
            name, param = member if isinstance(member, tuple) else (None, member)
            if name is not None:
                names.setdefault(id(param), name)
            if id(param) not in names:
                unnamed.append(zero.full_shape(param))
            tensors.append(param)
        groups.append({**user_group, "params": tensors})
    if unnamed:
        shown = ", ".join(str(list(s)) for s in unnamed[:NAMES_SHOWN])
        raise UnsupportedDeepSpeedSetupError(
            f"MuonDS needs every parameter's name to route by Moonlight's rule (embeddings "
            f"and the output head on AdamW cannot be told from hidden matrices by shape), "
            f"but {len(unnamed)} of {sum(len(g['params']) for g in groups)} parameters have "
            f"none (shapes {shown}{', ...' if len(unnamed) > NAMES_SHOWN else ''}). Pass the "
            "model: OrthogonalizedZeroOptimizer(model, ...) or model=model beside param "
            "groups (in Hugging Face's Trainer: optimizer_cls_and_kwargs="
            '(OrthogonalizedZeroOptimizer, {"model": model, ...})); or named parameters: '
            "OrthogonalizedZeroOptimizer(model.named_parameters(), ...); or name it in the "
            'DeepSpeed config ("type": "MuonDS"), where the engine hands it the model'
        )
    return groups, names


def split_groups(
    user_groups: list[dict[str, Any]], config: MuonConfig, names: dict[int, str]
) -> tuple[list[dict[str, Any]], dict[int, list[torch.Tensor]]]:
    """User groups -> a Muon half and an AdamW half each (and exempt groups), remembering
    their model params.

    ZeRO flattens each group into one partition, so each half becomes a buffer that is
    wholly Muon (fp32 momentum, 4 bytes/element) or wholly AdamW (8 bytes/element).
    """
    groups: list[dict[str, Any]] = []
    for user_group in user_groups:
        for param in user_group["params"]:
            if getattr(param, "use_muon", False):
                raise UnsupportedDeepSpeedSetupError(
                    "a parameter carries use_muon=True, DeepSpeed's own Muon tag; MuonDS routes "
                    "with muon_ds.set_route(param, 'muon') instead (remove use_muon)"
                )
        groups += split_param_group(
            user_group, lambda p: group_key(names[id(p)], p, config, zero.full_shape(p))
        )
    model_params = {}
    for key, group in enumerate(groups):
        group[GROUP_KEY] = key
        model_params[key] = group["params"]
    return groups, model_params
