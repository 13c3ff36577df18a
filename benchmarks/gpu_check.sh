#!/usr/bin/env bash
# The prepared accelerator check (issue 4): the overhead table on a CUDA machine that has torch
# but none of the four frameworks. Prepare here: `make gpu-site` (the frameworks, pure Python,
# into .gpu/site). There, from the repository root, with .gpu carried:
#
#   KLJ_COMMIT=<commit> bash benchmarks/gpu_check.sh
#
# Writes env.txt, overhead.log and cuda.json / cuda.md (rewritten after every model and backend,
# so a run cut short keeps what it measured) to $OUT (default .gpu/out); copy the last two to
# benchmarks/results/overhead/. Without a GPU: KLJ_DEVICE=cpu KLJ_OVERHEAD_ARGS=--quick. On a
# tight device budget, KLJ_OVERHEAD_ARGS="--variants plain,plain-again,hooks,floor,capture,
# second-pass" (one line) skips the variants that take longest to set up or run (fused
# compiles once per model; exact runs D backward passes per step; Hutchinson two passes).
set -uo pipefail
cd "$(dirname "$0")/.."
py=${PYTHON:-python3}
out=${OUT:-.gpu/out}
device=${KLJ_DEVICE:-cuda}
mkdir -p "$out"
export PYTHONPATH="$PWD/.gpu/site:$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1

"$py" - "$device" <<'PY' 2>&1 | tee "$out/env.txt" || exit 1
import sys

import torch

import klj_reg

device = sys.argv[1]
print("python", sys.version.split()[0], "torch", torch.__version__, "klj_reg", klj_reg.__version__)
for name in ("FrEIA", "nflows", "normflows", "zuko"):
    module = __import__(name)
    print(name, getattr(module, "__version__", "?"), module.__file__)
if device == "cuda":
    if not torch.cuda.is_available():
        sys.exit("no CUDA device")
    print(torch.cuda.get_device_name(), f"{torch.cuda.get_device_properties(0).total_memory / 2**30:.0f} GiB")
PY

# shellcheck disable=SC2086  # KLJ_OVERHEAD_ARGS is a list of options
"$py" -m benchmarks overhead --device "$device" --out "$out" ${KLJ_OVERHEAD_ARGS:-} 2>&1 \
    | grep -v '^USDT' | tee "$out/overhead.log"
