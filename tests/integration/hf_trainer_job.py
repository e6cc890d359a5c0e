"""Hugging Face ``Trainer`` + DeepSpeed ZeRO-1 + MuonDS on CPU ranks, as a user runs it.

Started by tests/integration/test_hf_trainer.py through torchrun
(``torchrun --standalone --nproc_per_node 2 -m tests.integration.hf_trainer_job OUT``).
Each rank runs every case in one process and writes ``OUT/rank<r>.json``:

- ``json``: ``launch/configs/hf_trainer_zero1.json`` as is (HF's "auto" template), 4 steps,
  a checkpoint at step 2;
- ``resume``: the same from that checkpoint (``resume_from_checkpoint``) to step 4;
- ``client``: no optimizer in the config; ``optimizer_cls_and_kwargs`` with ``model``;
- ``client_without_model``: the same without ``model`` (must be refused).

Parameters are compared in-process (max absolute difference) so nothing large is written.
"""

from __future__ import annotations

import copy
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

CONFIG = Path(__file__).resolve().parents[2] / "launch" / "configs" / "hf_trainer_zero1.json"
STEPS = 4
LR = 0.02
WEIGHT_DECAY = 0.1
ADAM_BETA2 = 0.98  # not HF's default (0.999), so the test sees "auto" filled from it


class Tokens(torch.utils.data.Dataset):
    """Fixed random token sequences; labels are the inputs (HF shifts them)."""

    def __init__(self, count: int = 64, length: int = 16, vocab: int = 64) -> None:
        generator = torch.Generator().manual_seed(1234)
        self.ids = torch.randint(0, vocab, (count, length), generator=generator)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[index], "labels": self.ids[index]}


def tiny_llama() -> torch.nn.Module:
    """A 2-layer Llama built in code (no download): embeddings and head untied."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=32,
        tie_word_embeddings=False,
    )
    return LlamaForCausalLM(config)


def make_trainer(
    out: Path,
    deepspeed: dict[str, Any],
    build: Callable[[], torch.nn.Module] = tiny_llama,
    **kwargs: Any,
) -> Any:
    """A Trainer on a fresh model from ``build`` (after the arguments, as HF requires for
    ZeRO-3's ``zero.Init`` in ``from_pretrained``); accelerate's process-wide state is reset
    first, as each Trainer of this process brings its own DeepSpeed config."""
    from accelerate.state import AcceleratorState
    from transformers import Trainer, TrainingArguments

    AcceleratorState._reset_state()
    args = TrainingArguments(
        output_dir=str(out),
        deepspeed=deepspeed,
        max_steps=STEPS,
        save_steps=2,
        per_device_train_batch_size=4,
        learning_rate=LR,
        weight_decay=WEIGHT_DECAY,
        adam_beta2=ADAM_BETA2,
        lr_scheduler_type="linear",
        max_grad_norm=1.0,
        logging_steps=1,
        report_to=[],
        save_only_model=False,
        seed=7,
        dataloader_num_workers=0,
        use_cpu=True,
    )
    model = kwargs.pop("model", None) or build()
    return Trainer(model=model, args=args, train_dataset=Tokens(), **kwargs)


def params_of(trainer: Any) -> dict[str, torch.Tensor]:
    """Every parameter, whole: gathered from ZeRO-3's partitions (a no-op below stage 3)."""
    import deepspeed

    named = list(trainer.model.named_parameters())
    with deepspeed.zero.GatheredParameters([p for _, p in named]):
        return {n: p.detach().clone() for n, p in named}


def max_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return max((a[n] - b[n]).abs().max().item() for n in a)


def routes_of(trainer: Any) -> list[list[Any]]:
    import muon_ds

    report = muon_ds.routing_report(trainer.optimizer)
    return [[t.name, t.route, t.weight_decay] for t in report.tensors]


def run(out: Path) -> dict[str, Any]:
    import muon_ds.deepspeed
    from muon_ds.patches.deepspeed import skip_shm_op_build

    skip_shm_op_build()
    template = json.loads(CONFIG.read_text())
    result: dict[str, Any] = {}

    straight = make_trainer(out / "json", copy.deepcopy(template))
    straight.train()
    optimizer = straight.model_wrapped.basic_optimizer
    result["json"] = {
        "betas": list(optimizer.config.adamw_betas),
        "eps": optimizer.config.adamw_eps,
        "lr": optimizer.config.lr,
        "weight_decay": optimizer.config.weight_decay,
        "routes": routes_of(straight),
        "losses": [e["loss"] for e in straight.state.log_history if "loss" in e],
    }
    final = params_of(straight)
    initial = dict(tiny_llama().named_parameters())
    result["json"]["moved"] = max_difference(final, {n: p.detach() for n, p in initial.items()})

    resumed = make_trainer(out / "json", copy.deepcopy(template))
    resumed.train(resume_from_checkpoint=str(out / "json" / "checkpoint-2"))
    result["resume"] = {"max_difference": max_difference(final, params_of(resumed))}

    no_optimizer = {k: v for k, v in template.items() if k != "optimizer"}
    kwargs = {"lr": LR, "weight_decay": WEIGHT_DECAY, "betas": [0.9, ADAM_BETA2], "eps": 1e-8}
    model = tiny_llama()
    client = make_trainer(
        out / "client",
        copy.deepcopy(no_optimizer),
        model=model,
        optimizer_cls_and_kwargs=(
            muon_ds.deepspeed.OrthogonalizedZeroOptimizer,
            {**kwargs, "model": model},
        ),
    )
    client.train()
    result["client"] = {
        "routes": routes_of(client),
        "max_difference_to_json": max_difference(final, params_of(client)),
    }

    refused = make_trainer(
        out / "refused",
        copy.deepcopy(no_optimizer),
        optimizer_cls_and_kwargs=(muon_ds.deepspeed.OrthogonalizedZeroOptimizer, dict(kwargs)),
    )
    try:
        refused.train()
        result["client_without_model"] = "no error"
    except muon_ds.deepspeed.UnsupportedDeepSpeedSetupError as error:
        result["client_without_model"] = str(error)
    return result


def main(job: Callable[[Path], dict[str, Any]]) -> None:
    """Run ``job`` on the folder named on the command line; write ``rank<r>.json`` there.

    The process group is destroyed before exit: left to the interpreter's teardown, gloo's
    threads were once seen to abort the process ("terminate called without an active
    exception") after the results were written."""
    directory = Path(sys.argv[1])
    outcome = job(directory)
    (directory / f"rank{os.environ['RANK']}.json").write_text(json.dumps(outcome))
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(run)
