"""The scale model's table, plot and command line."""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from collections.abc import Sequence
from pathlib import Path

from benchmarks.scale_model.layouts import SHARDING_NAMES, SHARDINGS, Layout, check_layout
from benchmarks.scale_model.specs import (
    ADAMW_BYTES_PER_ELEMENT,
    MODELLED_BF16_UNITS,
    MODELS,
    MUON_BYTES_PER_ELEMENT,
)
from benchmarks.scale_model.timing import RATE_HELP, SCHEMES, Rates, model_layout
from muon_ds.config import NS_ALGORITHMS, MuonConfig
from muon_ds.device import choose_ns_dtype

LADDER = (8, 64, 256, 512, 1024)
DEFAULT_LAYOUTS = [
    *[("moonlight-16b", Layout(n, 1, 8)) for n in LADDER],
    ("moonlight-16b", Layout(256, 2, 8)),
    *[("llama3-8b", Layout(n, 1, 1)) for n in LADDER],
    ("llama3-8b", Layout(1024, 4, 1)),
    *[("llama-70b", Layout(n, 8, 1)) for n in LADDER],
]


def parse_layout(text: str) -> tuple[str, Layout]:
    """``model:gpus[:tp[:ep]]``, e.g. ``moonlight-16b:256:1:8``."""
    parts = text.split(":")
    if parts[0] not in MODELS or not 2 <= len(parts) <= 4:
        raise argparse.ArgumentTypeError(
            f"layout {text!r}: expected model:gpus[:tp[:ep]] with model one of {sorted(MODELS)}"
        )
    try:
        numbers = [int(x) for x in parts[1:]]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"layout {text!r}: gpus, tp and ep must be integers"
        ) from None
    return parts[0], Layout(*numbers)


def _pct(x: float) -> str:
    return f"{100 * x:.2f}%"


def markdown(rows: Sequence[dict]) -> str:
    head = (
        "| model | GPUs | layout | compute s | muon_ds opt ms (share) | Alg-1 opt ms (share) "
        "| Megatron whole opt ms (share) |\n|---|---:|---|---:|---:|---:|---:|\n"
    )
    lines = []
    for row in rows:
        s = row["schemes"]
        cells = [f"{s[k]['optimizer_ms']:.2f} ({_pct(s[k]['share'])})" for k in SCHEMES]
        lines.append(
            f"| {row['model']} | {row['gpus']} | {row['layout']} | {row['compute_s']:.3f} | "
            + " | ".join(cells)
            + " |"
        )
    detail = (
        "| model | GPUs | layout | scheme | exchange ms | team ms | NS ms | elementwise ms | "
        "max MB sent (inter-node) | max NS TFLOP | NS redundancy | NS max/mean | padding |\n"
        "|---|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n"
    )
    details = []
    for row in rows:
        for k in SCHEMES:
            r = row["schemes"][k]
            pad = "" if r["padding"] is None else _pct(r["padding"])
            details.append(
                f"| {row['model']} | {row['gpus']} | {row['layout']} | {k} | "
                f"{r['exchange_ms']:.2f} | {r['team_ms']:.2f} | {r['ns_ms']:.2f} | "
                f"{r['elementwise_ms']:.2f} | "
                f"{r['max_bytes_sent'] / 1e6:.1f} ({r['max_inter_node_bytes_sent'] / 1e6:.1f}) | "
                f"{r['max_ns_tflop']:.2f} | {r['ns_redundancy']:.2f} | {r['ns_imbalance']:.2f} | "
                f"{pad} |"
            )
    return (
        "Optimizer time per step (slowest rank) and its share of step time\n\n"
        + head
        + "\n".join(lines)
        + "\n\nCounted costs (slowest rank's time parts; bytes and FLOPs are per step)\n\n"
        + detail
        + "\n".join(details)
    )


VARIANTS = (("standard", 1), ("auto", 1), ("standard", 8), ("auto", 8))
"""(ns_algorithm, owner_team_max) of ``--compare``: Gram and teams off and on."""


def compare(layouts: Sequence[tuple[str, Layout]], rates: Rates) -> tuple[str, list[dict]]:
    """muon_ds's time parts on every layout under each of ``VARIANTS`` (slowest rank)."""
    lines = [
        "| model | GPUs | layout | ns_algorithm | teams of at most | share | floor | "
        "exchange ms | team ms | NS ms | elementwise ms | NS max/mean |",
        "|---|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    found = []
    for key, layout in layouts:
        for algorithm, teams in VARIANTS:
            config = MuonConfig(ns_algorithm=algorithm, owner_team_max=teams)
            r = model_layout(MODELS[key], layout, rates, config)["schemes"]["muon_ds"]
            found.append(
                {
                    "model": key,
                    "layout": layout.label(),
                    "gpus": layout.gpus,
                    "ns_algorithm": algorithm,
                    "owner_team_max": teams,
                    **r,
                }
            )
            lines.append(
                f"| {key} | {layout.gpus} | {layout.label()} | {algorithm} | {teams} | "
                f"{_pct(r['share'])} | {_pct(r['floor_share'])} | "
                f"{r['exchange_ms']:.2f} | {r['team_ms']:.2f} | "
                f"{r['ns_ms']:.2f} | {r['elementwise_ms']:.2f} | {r['ns_imbalance']:.2f} |"
            )
    return "\n".join(lines), found


def plot(rows: Sequence[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter

    models = list(dict.fromkeys(row["model"] for row in rows))
    fig, axes = plt.subplots(1, len(models), figsize=(5 * len(models), 4), squeeze=False)
    styles = {
        "muon_ds": ("C0", "o-"),
        "moonlight_alg1": ("C1", "s--"),
        "megatron_whole": ("C2", "^:"),
    }
    for ax, model in zip(axes[0], models, strict=True):
        mine = [r for r in rows if r["model"] == model]
        for n, tp in enumerate(
            sorted({r["tp"] for r in mine}, key=lambda t: -sum(r["tp"] == t for r in mine))
        ):
            series = sorted((r for r in mine if r["tp"] == tp), key=lambda r: r["gpus"])
            for k in SCHEMES:
                color, style = styles[k]
                ax.plot(
                    [r["gpus"] for r in series],
                    [100 * r["schemes"][k]["share"] for r in series],
                    style,
                    color=color,
                    markerfacecolor=color if n == 0 else "none",
                    label=f"{k} (TP{tp})",
                )
        ax.axhline(1.0, color="grey", linewidth=0.8)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xticks(sorted({r["gpus"] for r in mine}))
        plain = FuncFormatter(lambda value, _: f"{value:g}")
        for formatter in (ax.xaxis.set_major_formatter, ax.yaxis.set_major_formatter):
            formatter(plain)
        ax.yaxis.set_minor_formatter(plain)
        ax.set_xlabel("GPUs")
        ax.set_ylabel("optimizer share of step time (%)")
        shardings = dict.fromkeys(SHARDING_NAMES[r["sharding"]] for r in mine)
        ax.set_title(f"{model}, {', '.join(shardings)}")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(
        description="Scale model: the Muon optimizer's share of step time at full size, up to "
        "1024 GPUs (see the package docstring for what it counts and assumes)."
    )
    defaults = Rates()
    for field in dataclasses.fields(Rates):
        parser.add_argument(
            "--" + field.name.replace("_", "-"),
            type=type(getattr(defaults, field.name)),
            default=getattr(defaults, field.name),
            help=f"{RATE_HELP[field.name]} (default {getattr(defaults, field.name)})",
        )
    parser.add_argument(
        "--layout",
        type=parse_layout,
        action="append",
        help="model:gpus[:tp[:ep]], repeatable; default: a ladder of 8..1024 GPUs per model",
    )
    parser.add_argument(
        "--ns-algorithm",
        choices=NS_ALGORITHMS,
        default="standard",
        help="muon_ds's Newton-Schulz algorithm (MuonConfig.ns_algorithm; default standard)",
    )
    parser.add_argument(
        "--owner-team-max",
        type=int,
        default=1,
        help="muon_ds's largest owner team (MuonConfig.owner_team_max; default 1: no teams)",
    )
    parser.add_argument(
        "--sharding",
        choices=SHARDINGS,
        default="zero1",
        help="how every layout's DP groups shard the params: zero1 (one flat buffer split "
        "evenly), zero3 (each param in flat ranges) or fsdp2 (each param in row ranges); "
        "default zero1",
    )
    parser.add_argument(
        "--compare",
        action="store_true",
        help="also print muon_ds's time parts with Gram and teams off and on (four runs)",
    )
    parser.add_argument(
        "--out", type=Path, default=Path("out/scale_model"), help="writes OUT.json and OUT.png"
    )
    args = parser.parse_args()
    config = MuonConfig(ns_algorithm=args.ns_algorithm, owner_team_max=args.owner_team_max)
    layouts = [
        (key, dataclasses.replace(layout, sharding=args.sharding))
        for key, layout in args.layout or DEFAULT_LAYOUTS
    ]
    try:
        rates = Rates(**{f.name: getattr(args, f.name) for f in dataclasses.fields(Rates)})
        for key, layout in layouts:
            check_layout(MODELS[key], layout, rates.gpus_per_node)
    except ValueError as error:
        parser.error(str(error))

    print("Scale model (counted by muon_ds.plan; no GPU ran). Parameters:")
    for line in rates.describe():
        print("  " + line)
    wire = str(choose_ns_dtype(config.ns_dtype, MODELLED_BF16_UNITS)).removeprefix("torch.")
    print(
        f"  Muon: {config.ns_steps} NS steps, {wire} on the wire (ns_dtype "
        f"{config.ns_dtype!r} on {MODELLED_BF16_UNITS}), owner imbalance "
        f"limit {config.owner_imbalance_limit}, buckets of {config.exchange_bucket_mb:g} MiB, "
        f"ns_algorithm {config.ns_algorithm!r}, owner teams of at most {config.owner_team_max}"
    )
    print(f"  params sharded as {SHARDING_NAMES[args.sharding]} ({args.sharding}) in every layout")
    for key in dict.fromkeys(k for k, _ in layouts):
        print(f"  {key}: {MODELS[key].description}")
    rows = []
    for key, layout in layouts:
        started = time.perf_counter()
        row = model_layout(MODELS[key], layout, rates, config)
        row["seconds_to_count"] = time.perf_counter() - started
        print(f"  counted {key} on {layout.label()} in {row['seconds_to_count']:.1f} s", flush=True)
        rows.append(row)
    print()
    print(markdown(rows))
    variants: list[dict] = []
    if args.compare:
        table, variants = compare(layouts, rates)
        print("\nmuon_ds: where the slowest rank's time goes, Gram and teams off and on\n")
        print(table)

    args.out.parent.mkdir(parents=True, exist_ok=True)
    report = {
        "rates": dataclasses.asdict(rates),
        "muon_bytes_per_element": MUON_BYTES_PER_ELEMENT,
        "adamw_bytes_per_element": ADAMW_BYTES_PER_ELEMENT,
        "muon_config": dataclasses.asdict(config),
        "models": {k: MODELS[k].description for k in dict.fromkeys(k for k, _ in layouts)},
        "rows": rows,
        "variants": variants,
    }
    json_path, png_path = args.out.with_suffix(".json"), args.out.with_suffix(".png")
    json_path.write_text(json.dumps(report, indent=1))
    plot(rows, png_path)
    print(f"\nwrote {json_path} and {png_path}")


if __name__ == "__main__":
    main()
