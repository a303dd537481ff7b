#!/usr/bin/env bash
# GPU checks and figures on a machine with a CUDA GPU (≈10 min on one H200), in one go:
#   1. the tests that run only where torch sees a GPU (device placement; CPU and GPU give the
#      same structures for a seed; the shipped models guide the same on both),
#   2. the scaling benchmark on the GPU, 10^3 … 10^5 atoms (prior step, guided step to 10^4,
#      one 10^5-atom prior sample compared with 216-atom cells, validation of 10^4 and 10^5
#      atoms) → $OUT/scale_gpu.json;
#   with STAGE=guided instead, one guided 10^5-atom sample (`fast` guide, sampler=pc_quick)
#   compared with guided 216-atom cells → $OUT/scale_gpu_guided.json.
# Needs torch (with CUDA) importable by $PYTHON (default python3); the other dependencies either
# installed or as wheels in .whl/ (scripts/device_wheels.sh fetches them), and the assets in
# $XANESDIFF_ASSETS, else .assets/ when present, else ../shared. Without an installed xanesdiff,
# the checkout itself is put on the path under the package's name.
# For a machine with no network that receives only the checkout (such as this workplace's device
# tool): here `bash scripts/device_wheels.sh; mkdir -p .assets; cp -r ../shared/models
# ../shared/data .assets/`, then run `bash scripts/device_check.sh` there carrying .whl and .assets.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
OUT=${OUT:-runs/device_check}
STAGE=${STAGE:-check}
mkdir -p "$OUT"
if [ -z "${XANESDIFF_ASSETS:-}" ]; then
    if [ -d .assets ]; then XANESDIFF_ASSETS=$(pwd)/.assets; else XANESDIFF_ASSETS=$(cd .. && pwd)/shared; fi
fi
export XANESDIFF_ASSETS HF_HUB_OFFLINE=1 MPLBACKEND=Agg PYTHONUNBUFFERED=1
if compgen -G ".whl/*.whl" > /dev/null; then  # before the machine's own packages on the path
    site=$(mktemp -d)
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target "$site" .whl/*.whl
    export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
fi
if ! "$PYTHON" -c 'import xanesdiff' 2>/dev/null; then
    pkg=$(mktemp -d)
    ln -s "$(pwd)" "$pkg/xanesdiff"
    export PYTHONPATH="$pkg${PYTHONPATH:+:$PYTHONPATH}"
fi
"$PYTHON" -c 'import torch; assert torch.cuda.is_available(), "torch sees no CUDA GPU"
print(torch.__version__, torch.cuda.get_device_name())' | tee "$OUT/device.txt"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv >> "$OUT/device.txt" || true

if [ "$STAGE" = guided ]; then
    "$PYTHON" -m xanesdiff.scripts.benchmark_scale --device cuda --atoms 1000 --guided-max 0 \
        --large 100000 --large-steps 20 --large-guided --surrogate fast --set sampler=pc_quick \
        --out "$OUT/scale_gpu_guided.json" 2>&1 | tee "$OUT/scale_guided.log"
    exit
fi
"$PYTHON" -m pytest -q -p no:cacheprovider -k "gpu" tests/test_devices.py \
    tests/test_generate_cli.py 2>&1 | tee "$OUT/tests.log"
"$PYTHON" -m xanesdiff.scripts.benchmark_scale --device cuda --atoms 1000 10000 100000 \
    --guided-max 10000 --large 100000 --validation 10000 100000 --out "$OUT/scale_gpu.json" \
    2>&1 | tee "$OUT/scale.log"
