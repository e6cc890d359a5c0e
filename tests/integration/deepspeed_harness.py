"""Run DeepSpeed ZeRO engines on gloo CPU ranks inside ``tests.dist.zero1.run_ranks``.

DeepSpeed's CPU accelerator JIT-builds a shared-memory all-reduce op the first time a
communication backend starts (minutes on a fresh machine). These tests measure muon_ds,
not that op, so ``use_gloo_only`` makes DeepSpeed's backend use plain gloo collectives
(``muon_ds.patches.deepspeed.skip_shm_op_build``).
"""

from __future__ import annotations

import os
from typing import Any

import torch


def use_gloo_only(rank: int, world: int) -> None:
    """Environment and the one shim DeepSpeed needs to join an existing gloo world."""
    os.environ.update(
        DS_ACCELERATOR="cpu",
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_WORLD_SIZE=str(world),
    )
    import deepspeed

    from muon_ds.patches.deepspeed import skip_shm_op_build

    skip_shm_op_build()
    deepspeed.init_distributed(dist_backend="gloo")


class TinyLM(torch.nn.Module):
    """Embedding, three hidden matrices of awkward sizes, biases, a head: enough to straddle."""

    def __init__(self, vocab: int = 29, hidden: int = 24) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, hidden)
        self.up = torch.nn.Linear(hidden, 3 * hidden + 5)
        self.mid = torch.nn.Linear(3 * hidden + 5, 37, bias=False)
        self.down = torch.nn.Linear(37, hidden)
        self.lm_head = torch.nn.Linear(hidden, vocab, bias=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens)
        x = x + self.down(torch.relu(self.mid(torch.relu(self.up(x)))))
        logits = self.lm_head(x)
        return torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.size(-1)).float(), tokens[:, 1:].reshape(-1)
        )


def batch(step: int, rank: int, micro: int, size: int = 4, length: int = 9) -> torch.Tensor:
    generator = torch.Generator().manual_seed(10_000 * step + 100 * rank + micro)
    return torch.randint(0, 29, (size, length), generator=generator)


def ds_config(optimizer: dict[str, Any], **overrides: Any) -> dict[str, Any]:
    config = {
        "train_micro_batch_size_per_gpu": 4,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": 0.0,
        "optimizer": optimizer,
        "zero_optimization": {"stage": 1},
        "steps_per_print": 10**6,
        "wall_clock_breakdown": False,
    }
    config.update(overrides)
    return config
