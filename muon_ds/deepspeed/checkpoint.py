"""What muon_ds keeps in DeepSpeed's ZeRO checkpoints, and the check on loading.

Muon's momentum goes under Adam's key (``MOMENTUM_KEY``) so DeepSpeed's own tools carry it;
every checkpoint file records each parameter's route and split group (``ROUTING_RECORD``),
and a checkpoint routed or grouped differently from the run is refused by name.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from muon_ds.deepspeed.groups import GROUP_KEY, NAMES_SHOWN
from muon_ds.routing import routing_mismatch

logger = logging.getLogger("muon_ds")

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


class ZeroCheckpointing:
    """The checkpoint methods of the DeepSpeed optimizer (a mixin before
    ``torch.optim.Optimizer``): they read its ``_groups`` (every split group),
    ``_model_params`` (each group's model parameters), ``_names`` and ``routing_report``."""

    _groups: list[dict[str, Any]]
    _model_params: dict[int, list[torch.Tensor]]
    _names: dict[int, str]

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
        """torch's state dict, plus a zero ``exp_avg_sq`` per Muon partition (see
        MOMENTUM_KEY) and the AdamW step count: DeepSpeed's ZeRO-3 universal loader reads
        the step of the first saved partition, a Muon one (Muon groups come first)."""
        packed = super().state_dict()
        steps = [s["step"] for s in packed["state"].values() if "step" in s]
        for group in packed["param_groups"]:
            if group["algorithm"] == "muon":
                for param_id in group["params"]:
                    state = packed["state"].get(param_id)
                    if state and MOMENTUM_KEY in state:
                        extra = {"exp_avg_sq": torch.zeros_like(state[MOMENTUM_KEY])}
                        if steps:
                            extra["step"] = steps[0]
                        packed["state"][param_id] = {**state, **extra}
        return packed

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        for group in self.param_groups:
            if group["algorithm"] == "muon":
                for param in group["params"]:
                    self.state[param].pop("exp_avg_sq", None)
                    self.state[param].pop("step", None)


def _group_mismatch(saved: list[list[str]], current: list[list[str]]) -> str | None:
    """Why a checkpoint's split groups do not match this run's, naming moved parameters."""
    if saved == current:
        return None
    where_saved = {name: index for index, names in enumerate(saved) for name in names}
    where_now = {name: index for index, names in enumerate(current) for name in names}
    moved = sorted(
        n for n in where_saved.keys() | where_now.keys() if where_saved.get(n) != where_now.get(n)
    )
    shown = ", ".join(moved[:NAMES_SHOWN]) + (", ..." if len(moved) > NAMES_SHOWN else "")
    return (
        f"the checkpoint groups parameters differently from this run ({len(saved)} param "
        f"groups saved, {len(current)} now; {len(moved)} parameters changed group: {shown}), "
        "although none changed route. ZeRO flattens each group into its own partition, so "
        "the saved state cannot be placed: load with the settings it was saved with "
        "(decay_vectors_and_embeddings, the param groups given to the optimizer)"
    )
