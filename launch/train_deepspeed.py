"""The main job: DeepSpeed ZeRO-1 on several ranks, muon_ds ("MuonDS") vs ZeRO-1 AdamW.

Run through the DeepSpeed launcher (``make demo`` does this on 2 CPU ranks):

    DS_ACCELERATOR=cpu deepspeed --num_gpus 2 --module launch.train_deepspeed

Both optimizers train the same tiny GPT on Python's own standard-library sources, with the
same data, lr schedule and steps; rank 0 prints the loss curves side by side, the
per-step communication of each run (DeepSpeed's comms logger for its own collectives, the
muon_ds counter for the Muon exchange), writes ``out/deepspeed_loss.png`` and
``out/deepspeed_results.json``. The first DeepSpeed run on a CPU machine JIT-builds
DeepSpeed's shared-memory op (a few minutes, cached afterwards).
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from pathlib import Path
from typing import Any

import deepspeed
import torch
import torch.distributed as dist

import muon_ds.deepspeed  # noqa: F401  (registers "type": "MuonDS")
from muon_ds.testing.corpus import stdlib_corpus, train_batch, val_batch
from muon_ds.testing.tiny_gpt import GPTConfig, init_model, lm_loss
from muon_ds.testing.training import evaluate, lr_factor

HERE = Path(__file__).resolve().parent


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=HERE / "configs" / "zero1_cpu_fp32.json")
    parser.add_argument("--steps", type=int, default=150)
    # Defaults: each optimizer's best peak lr in `make sweep` (python -m launch.demo) on this model.
    parser.add_argument("--muon-lr", type=float, default=0.024, help="peak lr of MuonDS")
    parser.add_argument("--adamw-lr", type=float, default=0.0015, help="peak lr of AdamW")
    parser.add_argument("--eval-every", type=int, default=15)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("out"))
    parser.add_argument("--local_rank", type=int, default=0, help="set by the DeepSpeed launcher")
    return parser.parse_args()


def run(name: str, ds_config: dict[str, Any], args: argparse.Namespace, peak_lr: float) -> dict:
    """Train one optimizer; return its curve and its per-step communication."""
    rank, world = dist.get_rank(), dist.get_world_size()
    corpus = stdlib_corpus()
    gpt = GPTConfig()
    model = init_model(gpt, args.seed)
    engine, *_ = deepspeed.initialize(
        model=model, model_parameters=model.parameters(), config=ds_config
    )
    global_batch = ds_config["train_micro_batch_size_per_gpu"] * world
    validation = val_batch(corpus.val, n_seqs=64, context=gpt.context)
    warmup = max(1, args.steps // 20)
    curve = []
    step_seconds: list[float] = []  # forward + backward + step, evaluation left out
    optimizer_seconds: list[float] = []  # engine.step(): the optimizer and the all-gather
    progress = _progress(args.steps, name) if rank == 0 else None
    deepspeed.comm.comms_logger.comms_dict.clear()
    for step in range(args.steps):
        for group in engine.optimizer.param_groups:
            group["lr"] = peak_lr * lr_factor(step, total_steps=args.steps, warmup_steps=warmup)
        inputs, targets = train_batch(
            corpus.train, step=step, batch_size=global_batch, context=gpt.context, seed=args.seed
        )
        started = time.perf_counter()
        loss = lm_loss(engine, inputs[rank::world], targets[rank::world])
        engine.backward(loss)
        stepping = time.perf_counter()
        engine.step()
        step_seconds.append(time.perf_counter() - started)
        optimizer_seconds.append(time.perf_counter() - stepping)
        if step % args.eval_every == 0 or step == args.steps - 1:
            train_loss = loss.detach().clone()
            dist.all_reduce(train_loss)
            curve.append(
                {
                    "step": step,
                    "train": train_loss.item() / world,
                    "val": evaluate(engine.module, validation),
                }
            )
        if progress is not None:
            progress.update(1)
            progress.set_postfix(loss=f"{loss.item():.3f}")
    if progress is not None:
        progress.close()
    return {
        "curve": curve,
        "deepspeed_bytes_per_step": _deepspeed_bytes(args.steps),
        "muon_exchange_bytes_per_step": _exchange_bytes(engine) / args.steps,
        "ns_matrices_per_step": _ns_matrices(engine) / args.steps,
        "step_ms_median": 1e3 * statistics.median(step_seconds),
        "optimizer_step_ms_median": 1e3 * statistics.median(optimizer_seconds),
    }


def _progress(total: int, name: str) -> Any:
    from tqdm import tqdm

    return tqdm(total=total, desc=f"{name:>6}", unit="step", dynamic_ncols=True)


def _deepspeed_bytes(steps: int) -> dict[str, float]:
    """Message bytes per step by collective, from DeepSpeed's own comms logger (this rank)."""
    per_op = {}
    for op, by_size in deepspeed.comm.comms_logger.comms_dict.items():
        per_op[op] = sum(size * record[0] for size, record in by_size.items()) / steps
    return per_op


def _exchange_bytes(engine: Any) -> float:
    """Bytes this rank sent in the Muon exchange (0 for AdamW), summed over ranks."""
    mine = torch.tensor(float(getattr(engine.basic_optimizer, "exchange_bytes", lambda: 0)()))
    dist.all_reduce(mine)
    return mine.item()


def _ns_matrices(engine: Any) -> float:
    mine = torch.tensor(float(getattr(engine.basic_optimizer, "ns_matrices", lambda: 0)()))
    dist.all_reduce(mine)
    return mine.item()


def report(results: dict[str, dict], args: argparse.Namespace, world: int) -> None:
    muon, adamw = results["MuonDS"], results["AdamW"]
    print(f"\nDeepSpeed ZeRO-1, {world} ranks, {args.steps} steps, tiny GPT on stdlib sources")
    print(f"{'step':>6} | {'MuonDS train':>12} {'val':>7} | {'AdamW train':>12} {'val':>7}")
    for m, a in zip(muon["curve"], adamw["curve"], strict=True):
        print(
            f"{m['step']:>6} | {m['train']:>12.4f} {m['val']:>7.4f} | "
            f"{a['train']:>12.4f} {a['val']:>7.4f}"
        )
    final = adamw["curve"][-1]["val"]
    reached = next((p["step"] for p in muon["curve"] if p["val"] <= final), None)
    print(
        f"\nfinal val loss: MuonDS {muon['curve'][-1]['val']:.4f}, AdamW {final:.4f}; "
        f"MuonDS first reached AdamW's final val loss at step {reached}"
    )
    print("\nper-step communication of rank 0 (bytes; DeepSpeed comms logger + Muon exchange):")
    ops = sorted(set(muon["deepspeed_bytes_per_step"]) | set(adamw["deepspeed_bytes_per_step"]))
    for op in ops:
        print(
            f"  {op:>26}: MuonDS {muon['deepspeed_bytes_per_step'].get(op, 0):>12,.0f}"
            f"   AdamW {adamw['deepspeed_bytes_per_step'].get(op, 0):>12,.0f}"
        )
    print("\nstep time on rank 0 (median ms; forward + backward + step, of which engine.step()):")
    for name, result in results.items():
        step, optimizer = result["step_ms_median"], result["optimizer_step_ms_median"]
        ratio = step / adamw["step_ms_median"]
        print(f"  {name:>6}: {step:8.1f}  ({optimizer:.1f})  {ratio:.2f}x AdamW's step")
    exchange = muon["muon_exchange_bytes_per_step"]
    print(f"  {'muon exchange (all ranks)':>26}: MuonDS {exchange:>12,.0f}   AdamW {0:>12,.0f}")
    print(f"  Newton-Schulz matrices per step (all ranks): {muon['ns_matrices_per_step']:.0f}")


def plot(results: dict[str, dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7, 4))
    for name, result in results.items():
        steps = [p["step"] for p in result["curve"]]
        axis.plot(steps, [p["val"] for p in result["curve"]], label=f"{name} (val)")
    axis.set_xlabel("step")
    axis.set_ylabel("loss (nats/byte)")
    axis.set_title("DeepSpeed ZeRO-1: muon_ds vs AdamW")
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def main() -> None:
    args = parse_args()
    deepspeed.init_distributed()
    torch.set_num_threads(1)
    base = json.loads(args.config.read_text())
    adamw = copy.deepcopy(base)
    adamw["optimizer"] = {
        "type": "AdamW",
        "params": {"lr": args.adamw_lr, "betas": [0.9, 0.95], "eps": 1e-8, "weight_decay": 0.1},
    }
    results = {
        "MuonDS": run("MuonDS", base, args, args.muon_lr),
        "AdamW": run("AdamW", adamw, args, args.adamw_lr),
    }
    if dist.get_rank() == 0:
        args.out.mkdir(parents=True, exist_ok=True)
        report(results, args, dist.get_world_size())
        plot(results, args.out / "deepspeed_loss.png")
        (args.out / "deepspeed_results.json").write_text(json.dumps(results, indent=1))
        print(
            f"\nwrote {args.out / 'deepspeed_loss.png'} and {args.out / 'deepspeed_results.json'}"
        )


if __name__ == "__main__":
    main()
