"""Hugging Face ``Trainer`` + DeepSpeed ZeRO-3 + MuonDS on CPU ranks, as a fine-tuner runs it.

Started by tests/integration/test_hf_trainer_zero3.py through torchrun
(``torchrun --standalone --nproc_per_node 2 -m tests.integration.hf_trainer_zero3_job OUT``).
The tiny Llama of ``hf_trainer_job`` is saved once and every case loads it with
``from_pretrained`` after its ``TrainingArguments``: under stage 3 HF then builds the model
inside ``deepspeed.zero.Init`` (matrices partitioned, ``param.shape`` empty), as
LlamaFactory or axolotl load one. Each rank runs, in one process, and writes
``OUT/rank<r>.json``:

- ``zero1``: ``launch/configs/hf_trainer_zero1.json``, 4 steps (the reference);
- ``zero3``: ``launch/configs/hf_trainer_zero3.json`` (HF's "auto" template for stage 3),
  4 steps, a checkpoint at step 2;
- ``resume``: the same from that checkpoint (``resume_from_checkpoint``) to step 4;
- ``frozen``: both stages again with the embeddings and the first layer frozen
  (``requires_grad=False``), as partial fine-tuning runs.

Both configs get ``"ns_dtype": "float32"``: Newton-Schulz otherwise follows the CPU
(bf16 where it multiplies bf16 natively), and in fp32 the two stages differ only in the
order the gradients are summed (ZeRO-1 all-reduces, ZeRO-3 reduce-scatters).
"""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path
from typing import Any

import torch

from tests.integration.hf_trainer_job import (
    CONFIG,
    main,
    make_trainer,
    max_difference,
    params_of,
    routes_of,
    tiny_llama,
)

ZERO3_CONFIG = CONFIG.with_name("hf_trainer_zero3.json")


def _config(path: Path) -> dict[str, Any]:
    config = json.loads(path.read_text())
    config["optimizer"]["params"]["ns_dtype"] = "float32"
    return config


def _pretrained(directory: Path) -> Any:
    from transformers import LlamaForCausalLM

    return LlamaForCausalLM.from_pretrained(directory, torch_dtype=torch.float32)


FROZEN = ("model.embed_tokens.", "model.layers.0.")
"""Name prefixes of the parameters the ``frozen`` case freezes."""


def _pretrained_frozen(directory: Path) -> Any:
    model = _pretrained(directory)
    for name, param in model.named_parameters():
        if name.startswith(FROZEN):
            param.requires_grad_(False)
    return model


def _frozen_case(out: Path, pretrained: Path, initial: dict[str, torch.Tensor]) -> dict:
    """Each stage with part of the model frozen: what it routes, how far the frozen params
    moved, and the difference between the stages' final params."""
    build = functools.partial(_pretrained_frozen, pretrained)
    found, finals = {}, []
    for name, config in (("zero1", CONFIG), ("zero3", ZERO3_CONFIG)):
        trainer = make_trainer(out / f"frozen_{name}", _config(config), build)
        trainer.train()
        final = params_of(trainer)
        frozen = {n: p for n, p in final.items() if n.startswith(FROZEN)}
        found[name] = {
            "routes": routes_of(trainer),
            "frozen_moved": max_difference(frozen, initial),
            "moved": max_difference(final, initial),
        }
        finals.append(final)
    found["max_difference_zero3_to_zero1"] = max_difference(*finals)
    return found


def _built_partitioned(trainer: Any) -> dict[str, int]:
    """How many params ``zero.Init`` partitioned before training (``ds_id``) and how many
    of those had an empty local ``shape`` (all of them, the small norms included: the
    persistence threshold applies later, inside the engine)."""
    params = list(trainer.model.parameters())
    return {
        "params": len(params),
        "partitioned": sum(hasattr(p, "ds_id") for p in params),
        "empty_shape": sum(hasattr(p, "ds_id") and p.shape == torch.Size([0]) for p in params),
    }


def run(out: Path) -> dict[str, Any]:
    import muon_ds.deepspeed  # noqa: F401  (registers "MuonDS", as a user's script does)
    from muon_ds.patches.deepspeed import skip_shm_op_build

    skip_shm_op_build()
    # Each rank saves its own copy (the same seeded weights): no rank waits on another's file.
    pretrained = out / f"pretrained{os.environ['RANK']}"
    tiny_llama().save_pretrained(pretrained)
    build = functools.partial(_pretrained, pretrained)
    initial = {n: p.detach() for n, p in tiny_llama().named_parameters()}
    result: dict[str, Any] = {}

    reference = make_trainer(out / "zero1", _config(CONFIG), build)
    reference.train()
    expected = params_of(reference)
    result["zero1"] = {"routes": routes_of(reference)}

    zero3 = make_trainer(out / "zero3", _config(ZERO3_CONFIG), build)
    result["zero3"] = {"built": _built_partitioned(zero3)}
    zero3.train()
    final = params_of(zero3)
    result["zero3"] |= {
        "stage": zero3.model_wrapped.zero_optimization_stage(),
        "routes": routes_of(zero3),
        "max_difference_to_zero1": max_difference(final, expected),
        "moved": max_difference(final, initial),
    }

    resumed = make_trainer(out / "zero3", _config(ZERO3_CONFIG), build)
    resumed.train(resume_from_checkpoint=str(out / "zero3" / "checkpoint-2"))
    result["resume"] = {"max_difference": max_difference(final, params_of(resumed))}
    result["frozen"] = _frozen_case(out, pretrained, initial)
    return result


if __name__ == "__main__":
    main(run)
