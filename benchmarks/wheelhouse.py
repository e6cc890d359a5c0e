"""Offline wheelhouse for the GPU check: ``make wheelhouse`` (``python -m benchmarks.wheelhouse``).

GPU clusters are often air-gapped, and the GPU image the check targets has torch, triton
and a few common packages but not DeepSpeed, Megatron-core or emerging-optimizers. This
builds, on a networked machine, one folder of wheels for CPython 3.12 on x86-64 manylinux
that ``benchmarks/gpu_check/install_wheels.sh`` installs there with ``--no-index
--no-deps``:

* muon_ds itself and DeepSpeed, built here (DeepSpeed's registry entry is an sdist; built
  with ``DS_BUILD_OPS=0`` it is pure Python and JIT-builds nothing the check uses);
* megatron-core and emerging-optimizers, and then every requirement of every wheel in the
  folder, downloaded as binary wheels for the target, until the closure is complete.

Every version comes from ``constraints.txt``. A requirement is left out only when the GPU
image provides it (``IMAGE_PROVIDES``): torch, triton and the ``nvidia-*`` wheels never
enter the folder. The install resolves nothing, so a package the image has but perhaps too
old (pydantic needs typing_extensions >= 4.16, megatron-core packaging >= 24.2) is shipped
anyway; the image is trusted only for requirements with no such version floor. The folder
must stay within ``LIMIT_MIB``.

    .venv/bin/python -m benchmarks.wheelhouse [--out out/wheelhouse]
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import zipfile
from email.parser import Parser
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name, parse_wheel_filename

REPO = Path(__file__).resolve().parents[1]
LIMIT_MIB = 60
PYTHON_VERSION = "3.12"
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64")
TARGET_MARKERS = {
    "python_version": PYTHON_VERSION,
    "python_full_version": f"{PYTHON_VERSION}.3",
    "implementation_name": "cpython",
    "platform_python_implementation": "CPython",
    "sys_platform": "linux",
    "platform_system": "Linux",
    "platform_machine": "x86_64",
    "os_name": "posix",
    "extra": "",
}
"""The GPU machine's Python (3.12.3, x86-64 Linux), for evaluating requirement markers."""

DOWNLOADED_ROOTS = ("megatron-core", "emerging-optimizers")
"""Downloaded as binary wheels; their requirements are followed like everyone else's."""
IMAGE_PROVIDES = frozenset(
    canonicalize_name(name)
    for name in (
        "torch",
        "triton",
        "numpy",
        "einops",
        "msgpack",
        "ninja",
        "psutil",
        "py-cpuinfo",
        "tqdm",
        "absl-py",
    )
)
"""Packages the GPU image has and the wheels require with no version floor it could miss."""
FORBIDDEN = re.compile(r"^(torch|triton|nvidia[-_].*)$")
"""Never shipped: the check must run on the machine's own CUDA stack."""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO / "out" / "wheelhouse")
    parser.add_argument("--constraints", type=Path, default=REPO / "constraints.txt")
    return parser.parse_args(argv)


def read_pins(constraints: Path) -> dict[str, str]:
    """``name==version`` lines of the constraints file, by canonical name."""
    pins = {}
    for line in constraints.read_text().splitlines():
        requirement = line.split("#", 1)[0].strip()
        if requirement:
            name, _, version = requirement.partition("==")
            if not version:
                raise ValueError(f"{constraints}: {line!r} is not an exact pin (name==version)")
            pins[canonicalize_name(name)] = version.strip()
    return pins


def pinned(name: str, pins: dict[str, str]) -> str:
    """``name==version`` from the pins; an unpinned dependency is an error, not a guess."""
    key = canonicalize_name(name)
    if key not in pins:
        raise SystemExit(f"{name} is needed in the wheelhouse but not pinned in constraints.txt")
    return f"{key}=={pins[key]}"


def pip(args: list[str], env: dict[str, str] | None = None) -> None:
    """Run this interpreter's pip quietly; its own error output explains a failure."""
    command = [sys.executable, "-m", "pip", *args, "--quiet", "--disable-pip-version-check"]
    subprocess.run(command, check=True, env=env, cwd=REPO)


def build_local_wheels(out: Path, pins: dict[str, str]) -> None:
    """muon_ds from this checkout and DeepSpeed from its sdist, with this venv's torch.

    No build isolation: DeepSpeed's setup.py imports torch, and an isolated build would
    download a second torch (GBs) just to build a pure-Python wheel. No wheel cache for
    DeepSpeed: a cached build may predate ``DS_BUILD_OPS=0``.
    """
    pip(["wheel", "--no-deps", "--no-build-isolation", "--wheel-dir", str(out), str(REPO)])
    pip(
        [
            *("wheel", "--no-deps", "--no-build-isolation", "--no-cache-dir"),
            *("--no-binary", "deepspeed", "--wheel-dir", str(out), pinned("deepspeed", pins)),
        ],
        env={**os.environ, "DS_BUILD_OPS": "0"},
    )


def download_wheels(out: Path, requirements: list[str]) -> None:
    """Binary wheels for the GPU machine's Python and platform, not this machine's."""
    platforms = [arg for platform in PLATFORMS for arg in ("--platform", platform)]
    pip(
        [
            *("download", "--only-binary=:all:", "--no-deps", "--implementation", "cp"),
            *("--python-version", PYTHON_VERSION, *platforms, "--dest", str(out)),
            *requirements,
        ]
    )


def wheel_requirements(wheel: Path) -> list[Requirement]:
    """The wheel's ``Requires-Dist`` entries that apply on the GPU machine, extras left out."""
    with zipfile.ZipFile(wheel) as archive:
        metadata = next(n for n in archive.namelist() if n.endswith(".dist-info/METADATA"))
        headers = Parser().parsestr(archive.read(metadata).decode())
    requirements = [Requirement(line) for line in headers.get_all("Requires-Dist") or []]
    return [r for r in requirements if r.marker is None or r.marker.evaluate(TARGET_MARKERS)]


def shipped(out: Path) -> dict[str, tuple[str, Path]]:
    """Canonical name -> (version, file) of every wheel in the folder."""
    found = {}
    for wheel in sorted(out.glob("*.whl")):
        name, version, _, _ = parse_wheel_filename(wheel.name)
        found[canonicalize_name(name)] = (str(version), wheel)
    return found


def unmet(out: Path) -> dict[str, list[str]]:
    """Requirements neither shipped (at a matching version) nor provided by the image.

    Maps each missing name to the requirements that ask for it, so a version clash (a
    shipped wheel outside a specifier) shows who asked for what.
    """
    wheels = shipped(out)
    missing: dict[str, list[str]] = {}
    for version_and_file in wheels.values():
        for requirement in wheel_requirements(version_and_file[1]):
            name = canonicalize_name(requirement.name)
            if name in IMAGE_PROVIDES:
                continue
            have = wheels.get(name)
            if have is None or not requirement.specifier.contains(have[0], prereleases=True):
                missing.setdefault(name, []).append(f"{version_and_file[1].name}: {requirement}")
    return missing


def complete_closure(out: Path, pins: dict[str, str]) -> None:
    """Download what the wheels require until nothing is missing (or a pin cannot satisfy)."""
    while missing := unmet(out):
        clashes = {name: asks for name, asks in missing.items() if name in shipped(out)}
        if clashes:
            raise SystemExit(f"pinned versions do not satisfy their dependents: {clashes}")
        download_wheels(out, [pinned(name, pins) for name in sorted(missing)])


def check_and_report(out: Path) -> int:
    """Print every wheel and the total; the exit status says whether the folder is usable."""
    wheels = shipped(out)
    forbidden = sorted(name for name in wheels if FORBIDDEN.match(name))
    total = 0
    for name, (version, wheel) in sorted(wheels.items()):
        size = wheel.stat().st_size
        total += size
        print(f"{size / 2**20:8.2f} MiB  {wheel.name}  ({name} {version})")
    print(f"{total / 2**20:8.2f} MiB  total, {len(wheels)} wheels in {out} (limit {LIMIT_MIB} MiB)")
    expected = sorted(IMAGE_PROVIDES & _required_names(out))
    print(f"expected from the GPU image (not shipped): {', '.join(expected)}")
    if forbidden:
        print(f"FAIL: the wheelhouse must not ship {forbidden}", file=sys.stderr)
        return 1
    if total > LIMIT_MIB * 2**20:
        print(f"FAIL: {total / 2**20:.2f} MiB is over the {LIMIT_MIB} MiB limit", file=sys.stderr)
        return 1
    return 0


def _required_names(out: Path) -> set[str]:
    """Every name some wheel in the folder requires on the GPU machine."""
    return {
        canonicalize_name(r.name)
        for _, wheel in shipped(out).values()
        for r in wheel_requirements(wheel)
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    pins = read_pins(args.constraints)
    args.out.mkdir(parents=True, exist_ok=True)
    for stale in args.out.glob("*.whl"):  # a previous build's pins must not linger
        stale.unlink()
    build_local_wheels(args.out, pins)
    download_wheels(args.out, [pinned(name, pins) for name in DOWNLOADED_ROOTS])
    complete_closure(args.out, pins)
    return check_and_report(args.out)


if __name__ == "__main__":
    sys.exit(main())
