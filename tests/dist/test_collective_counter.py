"""The benchmarks' collective counter sees every op with exact payload and ring wire bytes."""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.distributed as dist

from tests.dist.zero1 import run_ranks

pytestmark = pytest.mark.dist


def _count_each_op(rank: int, world: int) -> dict[str, Any]:
    from muon_ds.testing import collectives

    counter = collectives.install()
    assert collectives.install() is counter  # wrapping twice would count twice
    dist.all_reduce(torch.ones(10))  # fp32: 40 bytes
    dist.reduce(torch.ones(6, dtype=torch.bfloat16), 0)  # 12 bytes
    dist.all_gather_into_tensor(torch.empty(8 * world), torch.ones(8))
    dist.reduce_scatter_tensor(torch.empty(4), torch.ones(4 * world))
    # FSDP2's names for the two above (which call them inside distributed_c10d).
    dist.all_gather_single(torch.empty(2 * world), torch.ones(2))
    dist.reduce_scatter_single(torch.empty(3), torch.ones(3 * world))
    splits = [rank + 1] * world  # rank r sends r + 1 rows of 3 to every peer
    received = [r + 1 for r in range(world)]
    dist.all_to_all_single(
        torch.empty(sum(received), 3), torch.ones(sum(splits), 3), received, splits
    )
    with counter.pause():
        dist.all_reduce(torch.ones(1000))
    return counter.snapshot()


def test_payload_and_wire_bytes_follow_each_op_exactly() -> None:
    world = 4
    for rank, counted in enumerate(run_ranks(world, _count_each_op)):
        assert counted["all_reduce"] == {"calls": 1, "payload": 40, "wire": 2 * 3 * 40 // 4}
        assert counted["reduce"] == {"calls": 1, "payload": 12, "wire": 12}
        gathered = 8 * world * 4
        assert counted["all_gather_into_tensor"]["wire"] == 3 * gathered // 4
        assert counted["reduce_scatter_tensor"]["payload"] == 4 * world * 4
        # Each call counted once, under the name it was made by.
        assert counted["all_gather_into_tensor"]["calls"] == 1
        assert counted["reduce_scatter_tensor"]["calls"] == 1
        assert counted["all_gather_single"] == {
            "calls": 1,
            "payload": 2 * world * 4,
            "wire": 3 * 2 * world * 4 // 4,
        }
        assert counted["reduce_scatter_single"] == {
            "calls": 1,
            "payload": 3 * world * 4,
            "wire": 3 * 3 * world * 4 // 4,
        }
        sent_to_others = (world - 1) * (rank + 1) * 3 * 4
        assert counted["all_to_all_single"] == {
            "calls": 1,
            "payload": sent_to_others,
            "wire": sent_to_others,
        }
