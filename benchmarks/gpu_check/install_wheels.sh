#!/usr/bin/env bash
# Install the offline wheelhouse (`make wheelhouse`) into a private folder on the GPU machine.
#
#   benchmarks/gpu_check/install_wheels.sh WHEELS_DIR TARGET_DIR
#   export PYTHONPATH=TARGET_DIR${PYTHONPATH:+:$PYTHONPATH}
#
# The machine is offline and its own torch and triton must be the ones that run, so this
# installs with --no-index --no-deps into TARGET_DIR (never into the machine's environment)
# and refuses a wheelhouse that carries torch, triton or nvidia-* wheels. It prints the
# torch and triton it finds (torch >= 2.6 is required; triton >= 3.2 is wanted by the kernel
# parts, which report its absence themselves) and every package it installed.
# Where the interpreter has no pip (a uv-made venv has none), the wheels are unpacked
# directly: every wheel in the wheelhouse is pure Python or a plain binary extension, so
# unpacking is what pip would do, minus console scripts the check does not use.
# PYTHON (default python3) picks the interpreter.
set -euo pipefail

if [[ $# -ne 2 ]]; then
  echo "usage: $0 WHEELS_DIR TARGET_DIR" >&2
  exit 2
fi
wheels_dir=$1
target=$2
python=${PYTHON:-python3}

shopt -s nullglob
wheels=("$wheels_dir"/*.whl)
if [[ ${#wheels[@]} -eq 0 ]]; then
  echo "no wheels in $wheels_dir: build them with 'make wheelhouse' on a networked machine" >&2
  exit 1
fi
for wheel in "${wheels[@]}"; do
  case $(basename "$wheel") in
    torch-* | triton-* | nvidia_* | nvidia-*)
      echo "refusing $wheel: the check runs on the machine's own torch, triton and CUDA" >&2
      exit 1
      ;;
  esac
done

"$python" - <<'EOF'
import importlib.util
import sys

import torch
from torch.torch_version import TorchVersion  # version comparison without needing packaging

print(f"python {sys.version.split()[0]} ({sys.executable})")
print(f"torch {torch.__version__} (CUDA {torch.version.cuda}, GPU: {torch.cuda.is_available()})")
if torch.__version__ < (2, 6):
    sys.exit(f"torch {torch.__version__} is too old: muon_ds needs torch >= 2.6")
if importlib.util.find_spec("triton") is None:
    print("triton: not installed (the kernel parts will say what they skipped)")
else:
    import triton

    old = TorchVersion(triton.__version__) < (3, 2)
    print(f"triton {triton.__version__}" + (" (older than 3.2: kernel parts may fail)" if old else ""))
EOF

mkdir -p "$target"
if "$python" -m pip --version >/dev/null 2>&1; then
  "$python" -m pip install --no-index --no-deps --upgrade --target "$target" \
    --disable-pip-version-check --no-warn-script-location --quiet "${wheels[@]}"
else
  echo "no pip for $python: unpacking the wheels into $target instead"
  "$python" - "$target" "${wheels[@]}" <<'EOF'
import shutil
import sys
import zipfile
from pathlib import Path

target = Path(sys.argv[1])
for wheel in sys.argv[2:]:
    with zipfile.ZipFile(wheel) as archive:
        archive.extractall(target)
# A wheel's <name>.data/{purelib,platlib} belong in site-packages itself; scripts are dropped.
for data in target.glob("*.data"):
    for item in [*data.glob("purelib/*"), *data.glob("platlib/*")]:
        if item.is_dir():
            shutil.copytree(item, target / item.name, dirs_exist_ok=True)
        else:
            shutil.copy2(item, target / item.name)
    shutil.rmtree(data)
EOF
fi

"$python" - "$target" <<'EOF'
import importlib.metadata
import sys

target = sys.argv[1]
installed = sorted((d.metadata["Name"], d.version) for d in importlib.metadata.distributions(path=[target]))
for name, version in installed:
    print(f"installed {name} {version}")
print(f"{len(installed)} packages in {target}; use them with PYTHONPATH={target}")
EOF
