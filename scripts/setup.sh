#!/usr/bin/env bash
# Create .venv and install xanesdiff with everything it needs (CPU; about a minute here).
#   TORCH_SPEC  torch requirement to install first (default torch==2.13.0: the CPU build on this
#               machine's disk; on a CUDA machine use e.g. TORCH_SPEC="torch==2.13.0" with the
#               PyTorch index of your CUDA version in PIP_EXTRA_INDEX_URL).
#   PYTHON      interpreter for the venv (default python3, must be >= 3.11).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}

"$PYTHON" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "xanesdiff needs Python >= 3.11")'
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
# torch first, then pin exactly what was installed: matgl alone would resolve to a newer CUDA
# build of several GB (../shared/STACK.md).
.venv/bin/pip install -q "$TORCH_SPEC"
.venv/bin/python -c 'import torch; print(f"torch=={torch.__version__}")' > .venv/constraints.txt
.venv/bin/pip install -q -c .venv/constraints.txt -e ".[test]"
.venv/bin/xanesdiff --help > /dev/null
echo "xanesdiff installed in .venv ($(cat .venv/constraints.txt))"
