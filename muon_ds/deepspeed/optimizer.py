"""The optimizer DeepSpeed builds for ``"type": "MuonDS"``: a thin shell around the core.

It routes by Moonlight's rule, which needs parameter names and module types, so it is
built with the model in hand: from the config, the engine hook in
``muon_ds.patches.deepspeed`` passes the engine's module; built by hand (Hugging Face's
``optimizer_cls_and_kwargs``, ``deepspeed.initialize(optimizer=...)``) it takes the model
(``DeepSpeedZeroOrtho(model, ...)`` or ``model=`` beside param groups) or
``named_parameters()``, and refuses to build without names. Either way the engine hook
hands it the engine before ZeRO wraps it (``attach``), where stage, offload and
round-robin settings are checked; the first step checks again what ZeRO built.

ZeRO-1/2 flattens each param group into one fp32 partition per rank and calls ``step()``
once per group with only that group in ``param_groups`` (all groups at once under
``BF16_Optimizer``). Before that swap we split every user group into a Muon half and an
AdamW half (and, with ``decay_vectors_and_embeddings=False``, exempt groups) and remember
each half's model parameters; at a group's first step its ``ShardedMuonCore`` is built
from DeepSpeed's own partition map and DP group (read through ``muon_ds.patches``).

The class name deliberately lacks "muon": DeepSpeed 0.19.8 enters its own Muon code path
when the optimizer's class name contains it (``_is_muon_group`` in stage_1_and_2.py).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist

from muon_ds.config import MuonConfig
from muon_ds.device import describe_ns_dtype
from muon_ds.layout import GROUP_KEYS, ShardView, group_key, split_group_settings, tag_embeddings
from muon_ds.math import matrix_shape
from muon_ds.patches import deepspeed as patches
from muon_ds.plan import NsLedger
from muon_ds.routing import RoutedTensor, RoutingReport, print_on_rank0, routing_mismatch
from muon_ds.sharded import ShardedMuonCore

logger = logging.getLogger("muon_ds")

GROUP_KEY = "muon_ds_group"
"""Param-group key naming which split half a group is (a plain int, saved by torch)."""

MOMENTUM_KEY = "exp_avg"
"""Muon's momentum is stored as ``exp_avg``: DeepSpeed 0.19.8's universal-checkpoint
converter (``ds_to_universal``) carries only ``exp_avg`` and ``exp_avg_sq`` (its issue
#8608), and that converter is how a checkpoint moves to another DP size. Muon groups have
no second moment; ``state_dict`` writes zeros under ``exp_avg_sq`` for the converter and
loading drops them again. So ``safe_get_full_optimizer_state(p, "exp_avg")`` returns a
Muon matrix's full momentum (and an AdamW parameter's first moment)."""

ROUTING_RECORD = "muon_ds_routing"
"""Key of the routing record in every ZeRO checkpoint file (and a universal checkpoint's
``zero/optimizer_state.pt``): each parameter's route and the split group it lies in."""

_NAMES_SHOWN = 6


class UnsupportedDeepSpeedSetupError(RuntimeError):
    """The DeepSpeed configuration is one muon_ds does not train correctly."""


class DeepSpeedZeroOrtho(torch.optim.Optimizer):
    """muon_ds under DeepSpeed ZeRO stage 1 or 2 (registered as ``"MuonDS"``).

    ``params``: the model itself, ``model.named_parameters()``, or tensors / param groups
    with ``model=`` naming them; ``config_params``: MuonConfig keys (DeepSpeed's ``betas``
    and ``eps`` included). Without names for every parameter it refuses to build.
    """

    def __init__(
        self, params: Any, model: torch.nn.Module | None = None, **config_params: Any
    ) -> None:
        self.config = MuonConfig.from_dict(config_params)
        user_groups, names = _named_groups(params, model)
        groups, self._model_params = _split_groups(user_groups, self.config, names)
        _print_effective_config(self.config, groups)
        self._names = names
        defaults = {"lr": self.config.lr, "weight_decay": self.config.weight_decay}
        super().__init__(groups, defaults)
        # ZeRO shows step() one group at a time; the report and record need them all.
        self._groups = list(self.param_groups)
        self._cores: dict[int, ShardedMuonCore] = {}
        # Newton-Schulz FLOPs per global rank over every group's core built so far.
        self._ledger = NsLedger()
        self._reported = False

    def attach(self, engine: Any) -> None:
        """Refuse ZeRO settings muon_ds does not train correctly; the engine hook calls
        this inside ``deepspeed.initialize``, before ZeRO wraps the optimizer."""
        _refuse_unsupported(patches.zero_settings(engine))

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if not self._reported:
            self._first_step_checks()
            self._reported = True
            print_on_rank0(self.routing_report().lines())
        for group in self.param_groups:
            core = self._cores.get(group[GROUP_KEY]) or self._build_core(group)
            if group["algorithm"] == "muon":
                self.state[group["params"][0]].pop("exp_avg_sq", None)  # a universal load's
            core.run([(group["lr"], group["weight_decay"])], self.state)
            self._link_state(group)
        return loss

    def _link_state(self, group: dict[str, Any]) -> None:
        """Point each model param's DeepSpeed fragment at its slice of our state.

        DeepSpeed links these views (what ``safe_get_full_optimizer_state`` reads) only
        after group 0's first step; linking every group after its step keeps them valid.
        """
        model_params = self._model_params[group[GROUP_KEY]]
        patches.link_optimizer_state(model_params, group["params"][0], self.state)

    def _first_step_checks(self) -> None:
        """What ZeRO built must be stage 1/2 without offload, whatever path built us (the
        engine hook checked the settings already; this holds without it too)."""
        for params in self._model_params.values():
            for param in params:
                if patches.is_zero3_param(param):
                    raise UnsupportedDeepSpeedSetupError(
                        "MuonDS supports ZeRO stage 1 and 2, not stage 3"
                    )
                if not patches.is_zero12_param(param):
                    raise UnsupportedDeepSpeedSetupError(
                        "MuonDS steps inside a DeepSpeed engine with zero_optimization stage 1 "
                        f"or 2, but a parameter of shape {tuple(param.shape)} is not "
                        "partitioned by ZeRO: name MuonDS in the config or pass it to "
                        "deepspeed.initialize(optimizer=...)"
                    )
                fragment = patches.partition_fragment(param)
                if fragment is not None and fragment.offloaded:
                    raise UnsupportedDeepSpeedSetupError(
                        "MuonDS does not support offload_optimizer; remove it from "
                        "zero_optimization"
                    )

    # -- routing ----------------------------------------------------------------------

    def routed_tensors(self) -> list[RoutedTensor]:
        """Every parameter's name, shape, route and weight decay (``muon_ds.routing_report``)."""
        return [
            RoutedTensor(
                name=self._names[id(param)],
                shape=tuple(param.shape),
                route=group["algorithm"],
                weight_decay=group["weight_decay"],
            )
            for group in self._groups
            for param in self._model_params[group[GROUP_KEY]]
        ]

    def routing_report(self) -> RoutingReport:
        return RoutingReport(tuple(self.routed_tensors()))

    def routing_record(self) -> dict[str, Any]:
        """What a checkpoint records: each parameter's route, and the split groups' members
        (ZeRO flattens each group on its own, so a group change moves every offset)."""
        return {
            "routes": self.routing_report().routes(),
            "groups": [
                [self._names[id(p)] for p in self._model_params[group[GROUP_KEY]]]
                for group in self._groups
            ],
        }

    def check_routing_record(self, saved: dict[str, Any] | None) -> None:
        """Refuse a checkpoint routed or grouped differently from this run, naming the
        parameters, before DeepSpeed compares partition layouts."""
        if saved is None:
            logger.warning(
                "muon_ds: the checkpoint has no routing record (saved before muon_ds kept "
                "one); its optimizer state loads unchecked"
            )
            return
        problem = routing_mismatch(saved["routes"], self.routing_report().routes())
        if problem is None:
            problem = _group_mismatch(saved["groups"], self.routing_record()["groups"])
        if problem is not None:
            raise ValueError(f"muon_ds: {problem}")

    def state_dict(self) -> dict[str, Any]:
        """torch's state dict, plus a zero ``exp_avg_sq`` per Muon group (see MOMENTUM_KEY)."""
        packed = super().state_dict()
        for group in packed["param_groups"]:
            if group["algorithm"] == "muon":
                for param_id in group["params"]:
                    state = packed["state"].get(param_id)
                    if state and MOMENTUM_KEY in state:
                        zeros = torch.zeros_like(state[MOMENTUM_KEY])
                        packed["state"][param_id] = {**state, "exp_avg_sq": zeros}
        return packed

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        for group in self.param_groups:
            if group["algorithm"] == "muon":
                for param in group["params"]:
                    self.state[param].pop("exp_avg_sq", None)

    def _build_core(self, group: dict[str, Any]) -> ShardedMuonCore:
        key = group[GROUP_KEY]
        model_params = self._model_params[key]
        if len(group["params"]) != 1:
            raise UnsupportedDeepSpeedSetupError(
                f"MuonDS expects ZeRO stage 1 or 2 to hand it one flat partition per param "
                f"group, got {len(group['params'])} tensors; enable zero_optimization stage 1 or 2"
            )
        views = []
        for index, param in enumerate(model_params):
            fragment = patches.partition_fragment(param)
            if fragment is None:
                continue
            views.append(
                ShardView(
                    name=f"{key}.{index}:{self._names[id(param)]}",
                    matrix_shape=(
                        matrix_shape(param.shape)
                        if group["algorithm"] == "muon"
                        else (1, param.numel())
                    ),
                    start=fragment.param_start,
                    end=fragment.param_start + fragment.numel,
                    buffer=0,
                    offset=fragment.partition_start,
                    route=group["algorithm"],
                )
            )
        dp_group = patches.data_parallel_group(model_params[0]) if model_params else None
        core = ShardedMuonCore(
            group["params"],
            [group["algorithm"]],
            views,
            self.config,
            {"dense": dp_group},
            momentum_key=MOMENTUM_KEY,
            # ZeRO's step returns before calling us when the gradient norm is not finite.
            framework_skips_nonfinite=True,
            ledger=self._ledger,
        )
        self._cores[key] = core
        return core

    def exchange_bytes(self) -> int:
        """Bytes this rank sent in Muon exchanges since construction (all groups).

        Only the gather and scatter of matrix pieces; the 4-byte finite-gradient vote
        each step also makes is counted separately by each core's counter.
        """
        return sum(core.counter.exchange_bytes() for core in self._cores.values())

    def ns_matrices(self) -> int:
        """Matrices this rank orthogonalised since construction (all groups)."""
        return sum(core.counter.ns_matrices for core in self._cores.values())


def _named_groups(
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
                unnamed.append(tuple(param.shape))
            tensors.append(param)
        groups.append({**user_group, "params": tensors})
    if unnamed:
        shown = ", ".join(str(list(s)) for s in unnamed[:_NAMES_SHOWN])
        raise UnsupportedDeepSpeedSetupError(
            f"MuonDS needs every parameter's name to route by Moonlight's rule (embeddings "
            f"and the output head on AdamW cannot be told from hidden matrices by shape), "
            f"but {len(unnamed)} of {sum(len(g['params']) for g in groups)} parameters have "
            f"none (shapes {shown}{', ...' if len(unnamed) > _NAMES_SHOWN else ''}). Pass the "
            "model: DeepSpeedZeroOrtho(model, ...) or model=model beside param groups (in "
            "Hugging Face's Trainer: optimizer_cls_and_kwargs=(DeepSpeedZeroOrtho, "
            '{"model": model, ...})); or named parameters: '
            "DeepSpeedZeroOrtho(model.named_parameters(), ...); or name it in the DeepSpeed "
            'config ("type": "MuonDS"), where the engine hands it the model'
        )
    return groups, names


def _split_groups(
    user_groups: list[dict[str, Any]], config: MuonConfig, names: dict[int, str]
) -> tuple[list[dict[str, Any]], dict[int, list[torch.Tensor]]]:
    """User groups -> a Muon half and an AdamW half each (and exempt groups), remembering
    their model params.

    ZeRO flattens each group into one partition, so each half becomes a buffer that is
    wholly Muon (fp32 momentum, 4 bytes/element) or wholly AdamW (8 bytes/element).
    """
    groups: list[dict[str, Any]] = []
    model_params: dict[int, list[torch.Tensor]] = {}
    for user_group in user_groups:
        split: dict[tuple[str, bool], list[torch.Tensor]] = {key: [] for key in GROUP_KEYS}
        for param in user_group["params"]:
            if getattr(param, "use_muon", False):
                raise UnsupportedDeepSpeedSetupError(
                    "a parameter carries use_muon=True, DeepSpeed's own Muon tag; MuonDS routes "
                    "with muon_ds.set_route(param, 'muon') instead (remove use_muon)"
                )
            split[group_key(names[id(param)], param, config)].append(param)
        extra = {k: v for k, v in user_group.items() if k != "params"}
        for split_key, members in split.items():
            if members:
                key = len(groups)
                model_params[key] = members
                groups.append(
                    {
                        **extra,
                        **split_group_settings(split_key),
                        "params": members,
                        "algorithm": split_key[0],
                        GROUP_KEY: key,
                    }
                )
    return groups, model_params


def _group_mismatch(saved: list[list[str]], current: list[list[str]]) -> str | None:
    """Why a checkpoint's split groups do not match this run's, naming moved parameters."""
    if saved == current:
        return None
    where_saved = {name: index for index, names in enumerate(saved) for name in names}
    where_now = {name: index for index, names in enumerate(current) for name in names}
    moved = sorted(
        n for n in where_saved.keys() | where_now.keys() if where_saved.get(n) != where_now.get(n)
    )
    shown = ", ".join(moved[:_NAMES_SHOWN]) + (", ..." if len(moved) > _NAMES_SHOWN else "")
    return (
        f"the checkpoint groups parameters differently from this run ({len(saved)} param "
        f"groups saved, {len(current)} now; {len(moved)} parameters changed group: {shown}), "
        "although none changed route. ZeRO flattens each group into its own partition, so "
        "the saved state cannot be placed: load with the settings it was saved with "
        "(decay_vectors_and_embeddings, the param groups given to the optimizer)"
    )


def _print_effective_config(config: MuonConfig, groups: list[dict[str, Any]]) -> None:
    """Rank 0 prints the config and the Newton-Schulz dtype ``ns_dtype`` resolves to on the
    parameters' device (DeepSpeed has moved the model there before building us), so a
    run's log says whether "auto" picked bf16 or fp32, and why."""
    if dist.is_initialized() and dist.get_rank() != 0:
        return
    device = next((p.device for g in groups for p in g["params"]), torch.device("cpu"))
    ns = describe_ns_dtype(config.ns_dtype, device)
    print(f"muon_ds: effective {config}\nmuon_ds: Newton-Schulz and exchange in {ns}", flush=True)


def _refuse_unsupported(settings: patches.ZeroSettings) -> None:
    if settings.stage not in (1, 2):
        raise UnsupportedDeepSpeedSetupError(
            f"MuonDS needs zero_optimization stage 1 or 2, got {settings.stage}: it shards "
            "Muon's momentum like ZeRO-1 and exchanges only partition-straddling matrices"
        )
    if settings.offload_optimizer:
        raise UnsupportedDeepSpeedSetupError(
            "MuonDS does not support offload_optimizer; remove it from zero_optimization"
        )
    if settings.round_robin_gradients:
        raise UnsupportedDeepSpeedSetupError(
            "MuonDS does not support round_robin_gradients: DeepSpeed 0.19.8's partition map "
            "(_hp_mapping) does not follow the round-robin order; set it to false"
        )
