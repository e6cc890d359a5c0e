"""Run an unmodified Megatron entry script with ``--optimizer muon`` backed by muon_ds.

    python -m torch.distributed.run --nproc-per-node 8 -m muon_ds.megatron.run \\
        [--cpu] path/to/pretrain_gpt.py --optimizer muon --use-distributed-optimizer ...

Runner options come before the script; everything after it is the script's. The script
(Megatron-LM's ``pretrain_gpt.py``, or any written that way: it parses with
``parse_and_validate_args``, then calls ``pretrain(...)``) runs as ``python script.py``
would run it, with ``muon_ds.patches.megatron.hook_entry_point`` in place:

- its parser also gets muon_ds's flags (``add_muon_ds_args``: ``--muon-impl`` and the
  ``--muon-*`` knobs Megatron lacks);
- right after parsing, before the script builds its config from the arguments,
  ``use_muon_ds_from_args`` logs the effective MuonConfig and makes
  ``setup_model_and_optimizer`` build muon_ds (``--optimizer muon``, unless
  ``--muon-impl megatron``; any other optimizer runs untouched);
- when ``pretrain()`` returns, each rank reports its Newton-Schulz count and exchange bytes.

``--cpu`` installs ``muon_ds.patches.megatron_cpu`` first, so the same script trains on
CPU gloo ranks (with ``--distributed-backend gloo``). Where the megatron-core wheel (not a
Megatron-LM checkout) provides ``megatron``, its prebuilt dataset helpers are used
(``use_prebuilt_dataset_helpers``).
"""

from __future__ import annotations

import argparse
import runpy
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from muon_ds.megatron import add_muon_ds_args, use_muon_ds_from_args
from muon_ds.patches import megatron as patches


def runner_parser() -> argparse.ArgumentParser:
    """The runner's own options, then the script and its arguments, untouched."""
    parser = argparse.ArgumentParser(
        prog="python -m muon_ds.megatron.run",
        description="Run a Megatron entry script (e.g. Megatron-LM's pretrain_gpt.py) with "
        "muon_ds's flags and, for --optimizer muon, muon_ds's optimizer.",
        allow_abbrev=False,
    )
    parser.add_argument(
        "--cpu",
        action="store_true",
        help="train on CPU ranks (the script needs --distributed-backend gloo): installs "
        "muon_ds.patches.megatron_cpu",
    )
    parser.add_argument("script", type=Path, help="the entry script, run as its own __main__")
    parser.add_argument("script_args", nargs=argparse.REMAINDER, help="the script's arguments")
    return parser


class EntryHooks:
    """What the runner does at the entry script's parse and around its ``pretrain()``."""

    def __init__(self, cpu: bool) -> None:
        self.cpu = cpu
        self.parsed = False
        self.built: list[Any] | None = None

    def on_parsed(self, args: argparse.Namespace) -> None:
        """The script's arguments are validated: select muon_ds before it reads them."""
        if self.cpu and args.distributed_backend != "gloo":
            raise ValueError(
                "muon_ds.megatron.run --cpu: the script needs --distributed-backend gloo"
            )
        self.parsed = True
        self.built = use_muon_ds_from_args(args)

    def around_pretrain(self, pretrain: Callable[[], Any]) -> Any:
        """Train, then report muon_ds's work; refuse a script that skipped the parse."""
        if not self.parsed:
            raise RuntimeError(
                "muon_ds.megatron.run: the script called pretrain() without parsing through "
                "megatron.training.arguments.parse_and_validate_args, where muon_ds adds its "
                "flags and optimizer (as Megatron-LM's pretrain_gpt.py does for core 0.19)"
            )
        result = pretrain()
        if self.built:
            from muon_ds.megatron.optimizer import report_muon_ds_work

            report_muon_ds_work(self.built[-1])
        return result


def run_script(script: Path, script_args: Sequence[str]) -> None:
    """Run ``script`` as ``python script script_args...`` would: as ``__main__``, with
    ``sys.argv`` its own.

    ``python script.py`` also puts the script's directory first on the import path
    (Megatron-LM's ``pretrain_gpt.py`` imports ``gpt_builders`` and ``model_provider`` from
    beside it); ``python -m`` puts the current directory there instead. So the script must
    lie in the current directory, as Megatron-LM's launch scripts run it (from the checkout's
    root); anywhere else its sibling imports would fail or find other modules.
    """
    if not script.is_file():
        raise FileNotFoundError(f"muon_ds.megatron.run: no entry script {script}")
    if script.resolve().parent != Path.cwd().resolve():
        raise ValueError(
            f"muon_ds.megatron.run: the entry script {script} must lie in the current "
            f"directory ({Path.cwd()}): python -m imports from there, where python "
            f"{script.name} would import from the script's own directory. Run it from "
            f"{script.resolve().parent}"
        )
    sys.argv = [str(script), *script_args]
    runpy.run_path(str(script), run_name="__main__")


def main(argv: Sequence[str] | None = None) -> None:
    """Parse the runner's options, install the hooks (and CPU shims), run the script."""
    options = runner_parser().parse_args(argv)
    if options.cpu:
        from muon_ds.patches import megatron_cpu

        megatron_cpu.install()
    patches.use_prebuilt_dataset_helpers()
    hooks = EntryHooks(options.cpu)
    patches.hook_entry_point(add_muon_ds_args, hooks.on_parsed, hooks.around_pretrain)
    run_script(options.script, options.script_args)


if __name__ == "__main__":
    main()
