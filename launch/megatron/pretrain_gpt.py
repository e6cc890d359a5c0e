"""GPT pretraining through Megatron's own ``pretrain()``; ``--optimizer muon`` runs muon_ds.

The shape of Megatron-LM's ``pretrain_gpt.py`` (``model_provider``, a datasets provider,
``forward_step``), with three additions:

- ``add_muon_ds_args`` extends Megatron's parser (``--muon-impl`` and the ``--muon-*``
  knobs Megatron lacks); ``use_muon_ds_from_args`` turns the flags into a MuonConfig and
  makes ``setup_model_and_optimizer`` build muon_ds inside Megatron's distributed
  optimizer. ``--muon-impl megatron`` leaves Megatron's own Muon in place. (An entry
  script without these lines gets the same through ``python -m muon_ds.megatron.run``.)
- The data is embedded: byte-level windows of Python's standard-library sources
  (``muon_ds.testing.corpus``, vocabulary 256, held-out files for validation), so
  nothing is downloaded and no tokenizer is needed (``--tokenizer-type NullTokenizer``);
  ``--mock-data`` takes Megatron's own MockGPTDataset instead.
- ``--cpu`` (with ``--distributed-backend gloo``) installs ``muon_ds.patches.megatron_cpu``
  before anything else, so the same ``pretrain()`` runs on CPU ranks; GPU runs never load it.

Run from the repository root as a module, e.g. ``torchrun --nproc-per-node 4 -m
launch.megatron.pretrain_gpt ...`` (see ``train_cpu.sh`` and ``train_gpu.sh``).
"""

from __future__ import annotations

import argparse
from functools import partial
from typing import Any

import torch
from megatron.core.enums import ModelType
from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.gpt_layer_specs import (
    get_gpt_layer_local_spec,
    get_gpt_layer_with_transformer_engine_spec,
)
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.training import get_args, pretrain, print_rank_0
from megatron.training.argument_utils import pretrain_cfg_container_from_args
from megatron.training.arguments import core_transformer_config_from_args, parse_and_validate_args

from muon_ds.megatron import add_muon_ds_args, use_muon_ds_from_args
from muon_ds.megatron.optimizer import report_muon_ds_work
from muon_ds.patches.megatron import use_prebuilt_dataset_helpers
from muon_ds.testing.corpus import stdlib_corpus
from muon_ds.testing.tiny_gpt import VOCAB_SIZE


def add_cpu_arg(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument(
        "--cpu",
        action="store_true",
        help="train on CPU ranks (needs --distributed-backend gloo): installs "
        "muon_ds.patches.megatron_cpu",
    )
    return parser


def cpu_parser() -> argparse.ArgumentParser:
    """Just ``--cpu``, read before Megatron's parser (which knows it too, for --help)."""
    return add_cpu_arg(argparse.ArgumentParser(add_help=False, allow_abbrev=False))


def add_launch_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """muon_ds's flags, and ``--cpu``."""
    return add_cpu_arg(add_muon_ds_args(parser))


def layer_spec(args: argparse.Namespace) -> ModuleSpec:
    """Megatron's local or Transformer Engine layer, dense or MoE, as ``--transformer-impl``."""
    spec = (
        get_gpt_layer_local_spec
        if args.transformer_impl == "local"
        else get_gpt_layer_with_transformer_engine_spec
    )
    kwargs = {"normalization": args.normalization} if args.transformer_impl == "local" else {}
    return spec(args.num_experts, args.moe_grouped_gemm, args.qk_layernorm, **kwargs)


def model_provider(
    pre_process: bool = True,
    post_process: bool = True,
    vp_stage: int | None = None,
    config: Any = None,
    pg_collection: Any = None,
) -> GPTModel:
    """A GPTModel from the command line (``--num-experts`` makes its MLPs MoE layers)."""
    args = get_args()
    print_rank_0("building GPT model ...")
    return GPTModel(
        config=config or core_transformer_config_from_args(args),
        transformer_layer_spec=layer_spec(args),
        vocab_size=args.padded_vocab_size,
        max_sequence_length=args.max_position_embeddings,
        pre_process=pre_process,
        post_process=post_process,
        parallel_output=True,
        share_embeddings_and_output_weights=not args.untie_embeddings_and_output_weights,
        position_embedding_type=args.position_embedding_type,
        rotary_percent=args.rotary_percent,
        rotary_base=args.rotary_base,
        pg_collection=pg_collection,
        vp_stage=vp_stage,
    )


class ByteWindows(torch.utils.data.Dataset):
    """``samples`` windows of ``seq_length + 1`` bytes at seeded random offsets of ``tokens``.

    Item ``i`` is a function of ``(seed, i)`` alone, so every rank can build the same
    dataset and Megatron's sampler hands each DP rank its own items.
    """

    def __init__(self, tokens: torch.Tensor, samples: int, seq_length: int, seed: int) -> None:
        generator = torch.Generator().manual_seed(seed)
        self.tokens = tokens
        self.seq_length = seq_length
        self.starts = torch.randint(
            0, tokens.numel() - seq_length - 1, (samples,), generator=generator
        )
        self.positions = torch.arange(seq_length)
        self.loss_mask = torch.ones(seq_length)

    def __len__(self) -> int:
        return self.starts.numel()

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        start = int(self.starts[index])
        window = self.tokens[start : start + self.seq_length + 1].long()
        return {
            "tokens": window[:-1],
            "labels": window[1:],
            "loss_mask": self.loss_mask,
            "position_ids": self.positions,
        }


def train_valid_test_datasets_provider(
    num_samples: list[int], vp_stage: int | None = None
) -> tuple[Any, Any, Any]:
    """The embedded byte corpus, or Megatron's MockGPTDataset under ``--mock-data``."""
    args = get_args()
    return mock_datasets(num_samples) if args.mock_data else byte_datasets(num_samples)


def byte_datasets(num_samples: list[int]) -> tuple[ByteWindows, ByteWindows | None, None]:
    """Training windows from the training files, validation windows from held-out files."""
    args = get_args()
    if args.padded_vocab_size < VOCAB_SIZE:
        raise ValueError(f"byte-level data needs --vocab-size >= {VOCAB_SIZE}")
    corpus = stdlib_corpus()
    train, valid, _ = num_samples
    print_rank_0(
        f"> stdlib byte corpus: {corpus.train.numel()} training bytes "
        f"({len(corpus.train_files)} files), {corpus.val.numel()} validation bytes"
    )
    return (
        ByteWindows(corpus.train, train, args.seq_length, args.seed),
        ByteWindows(corpus.val, valid, args.seq_length, args.seed + 1) if valid else None,
        None,
    )


def mock_datasets(num_samples: list[int]) -> tuple[Any, Any, Any]:
    """Megatron's random-token datasets, built by its own builder (throughput runs)."""
    from megatron.core.datasets.blended_megatron_dataset_builder import (
        BlendedMegatronDatasetBuilder,
    )
    from megatron.core.datasets.gpt_dataset import GPTDatasetConfig, MockGPTDataset
    from megatron.training import get_tokenizer

    args = get_args()
    config = GPTDatasetConfig(
        random_seed=args.seed,
        sequence_length=args.seq_length,
        split=args.split,
        tokenizer=get_tokenizer(),
        reset_position_ids=args.reset_position_ids,
        reset_attention_mask=args.reset_attention_mask,
        eod_mask_loss=args.eod_mask_loss,
    )
    return BlendedMegatronDatasetBuilder(MockGPTDataset, num_samples, lambda: True, config).build()


# Every rank builds the (cheap, deterministic) datasets: no TP broadcast of batches.
train_valid_test_datasets_provider.is_distributed = True


def loss_func(
    loss_mask: torch.Tensor, output_tensor: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """Summed token loss, token count, and the report Megatron averages over DP ranks."""
    losses = output_tensor.view(-1).float()
    loss_mask = loss_mask.view(-1).float()
    loss = torch.sum(losses * loss_mask)
    tokens = loss_mask.sum().to(torch.int)
    return loss, tokens, {"lm loss": torch.cat([loss.detach().view(1), tokens.view(1)])}


def forward_step(data_iterator: Any, model: GPTModel) -> tuple[torch.Tensor, Any]:
    """One micro-batch: every TP rank of a DP rank reads the same items."""
    batch = next(data_iterator)
    device = torch.cuda.current_device()
    tokens, labels, loss_mask, position_ids = (
        batch[key].to(device) for key in ("tokens", "labels", "loss_mask", "position_ids")
    )
    seq = tokens.shape[1]
    causal_mask = torch.triu(torch.ones(1, 1, seq, seq, dtype=torch.bool, device=device), 1)
    output = model(tokens, position_ids, causal_mask, labels=labels, loss_mask=loss_mask)
    return output, partial(loss_func, loss_mask)


def main() -> None:
    # The CPU stand-ins go in before Megatron parses: its validate_args queries the GPU.
    cpu, _ = cpu_parser().parse_known_args()
    if cpu.cpu:
        from muon_ds.patches import megatron_cpu

        megatron_cpu.install()
    args = parse_and_validate_args(
        extra_args_provider=add_launch_args,
        args_defaults={"tokenizer_type": "NullTokenizer", "vocab_size": VOCAB_SIZE},
    )
    if args.cpu and args.distributed_backend != "gloo":
        raise ValueError("--cpu needs --distributed-backend gloo")
    if args.data_path or args.train_data_path or args.sft:
        raise ValueError(
            "pretrain_gpt.py trains on its embedded byte corpus or, with --mock-data, on "
            "Megatron's mock data; it reads no --data-path / --train-data-path / --sft data"
        )
    use_prebuilt_dataset_helpers()
    built = use_muon_ds_from_args(args)
    pretrain(
        pretrain_cfg_container_from_args(args),
        train_valid_test_datasets_provider,
        ModelType.encoder_or_decoder,
        forward_step,
        model_provider=model_provider,
    )
    if built:
        report_muon_ds_work(built[-1])


if __name__ == "__main__":
    main()
