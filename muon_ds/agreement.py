"""What every rank checks before the sharded step is planned: its own input, then that
all ranks agree (config, resolved Newton-Schulz dtype, groups).

Each rank describes its own problem (``local_problem``); the descriptions are gathered
and every rank runs ``check_agreement`` on all of them, so bad input raises the same clear
error on every rank instead of hanging a collective.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from muon_ds.layout import ShardView


def local_problem(
    buffers: Sequence[torch.Tensor],
    algorithms: Sequence[str],
    views: Sequence[ShardView],
    groups: Mapping[str, Any],
) -> str | None:
    """A description of what is wrong with this rank's own input, or None."""
    for algorithm in algorithms:
        if algorithm not in ("muon", "adamw"):
            return f"a buffer has algorithm={algorithm!r}; allowed: muon, adamw"
    devices = sorted({str(b.device) for b in buffers})
    if len(devices) > 1:
        return f"buffers lie on several devices {devices}; keep them on one"
    for view in views:
        if not 0 <= view.buffer < len(buffers):
            return f"view {view.name!r} names buffer {view.buffer}; there are {len(buffers)}"
        buffer = buffers[view.buffer]
        algorithm = algorithms[view.buffer]
        if algorithm != view.route:
            return (
                f"view {view.name!r} is routed to {view.route} but lies in buffer "
                f"{view.buffer} of a {algorithm} group; keep each buffer to one algorithm"
            )
        rows, cols = view.matrix_shape
        if not (0 <= view.start <= view.end <= rows * cols):
            return (
                f"view {view.name!r}: range [{view.start}, {view.end}) does not fit its "
                f"matrix_shape {view.matrix_shape} ({rows * cols} elements)"
            )
        if view.offset < 0 or view.offset + view.numel > buffer.numel():
            return (
                f"view {view.name!r}: elements [{view.offset}, {view.offset + view.numel}) "
                f"do not fit buffer {view.buffer} of {buffer.numel()} elements"
            )
        if view.group not in groups:
            return f"view {view.name!r} names group {view.group!r}; given: {sorted(groups)}"
        if buffer.dtype != torch.float32:
            return f"buffer {view.buffer} is {buffer.dtype}; ZeRO-1 master shards are fp32"
    return None


def check_agreement(everyone: list[dict[str, Any]]) -> None:
    """Raise the same error on every rank if any rank's input disagrees or is invalid."""
    for rank, mine in enumerate(everyone):
        if mine["problem"]:
            raise ValueError(f"muon_ds: rank {rank}: {mine['problem']}")
    reference = everyone[0]["config"]
    for rank, mine in enumerate(everyone):
        for key, value in mine["config"].items():
            if value != reference[key]:
                raise ValueError(
                    f"muon_ds: MuonConfig differs across ranks: {key}={reference[key]!r} on "
                    f"rank 0 but {value!r} on rank {rank}; every rank must use the same config"
                )
        if mine["ns_dtype"] != everyone[0]["ns_dtype"]:
            raise ValueError(
                f"muon_ds: ns_dtype={mine['config']['ns_dtype']!r} resolves to "
                f"{everyone[0]['ns_dtype']} on rank 0 but {mine['ns_dtype']} on rank {rank} "
                "(their devices differ in bf16 support); set ns_dtype to 'bfloat16' or "
                "'float32' so that every rank runs and sends the same dtype"
            )
        if mine["members"].keys() != everyone[0]["members"].keys():
            raise ValueError(
                f"muon_ds: rank {rank} names groups {sorted(mine['members'])}, rank 0 "
                f"{sorted(everyone[0]['members'])}; every rank must name the same groups"
            )
    for rank, mine in enumerate(everyone):
        for key, ranks in mine["members"].items():
            if rank not in ranks:
                raise ValueError(f"muon_ds: rank {rank}'s group {key!r} {list(ranks)} lacks it")
            for peer in ranks:
                if everyone[peer]["members"][key] != ranks:
                    raise ValueError(
                        f"muon_ds: group {key!r} disagrees across ranks: rank {rank} has "
                        f"{list(ranks)}, its member rank {peer} has "
                        f"{list(everyone[peer]['members'][key])}"
                    )
