#!/usr/bin/env bash
# Wheels for the offline GPU machine of scripts/device_check.sh (x86-64, Python 3.12, no network).
# Its python3 already has torch, torch-geometric, lightning, numpy, scipy, matplotlib, pandas,
# huggingface-hub, pytest, opt-einsum-fx ...; this fetches, here (where pip reaches the index), the
# packages it lacks that the project imports on the paths device_check.sh runs (tests, benchmark_scale
# with the M3GNet surrogates, the CLI), one version each, into .whl/ (ignored by git):
#   bash scripts/device_wheels.sh            # WHEEL_DIR=... to write elsewhere, WHEEL_PYTHON=3.11 for cp311
# On the GPU machine (the device run names `.whl` in carry), before device_check.sh:
#   python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
#       --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
# e3nn is carried although the machine has one: the score model needs 0.6.0 exactly. matgl's other
# requirements (pydantic, boto3, torchdata, full pymatgen, spglib, uncertainties ...) are not imported
# on these paths, so they are left out.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
WHEEL_DIR=${WHEEL_DIR:-.whl}
WHEEL_PYTHON=${WHEEL_PYTHON:-3.12}

# Pure-Python (py3-none-any) and compiled (cp3XX manylinux x86_64) wheels, versions as in .venv.
PACKAGES=(
    e3nn==0.6.0
    matgl==4.1.2
    pymatgen-core==2026.10.16   # pymatgen.core (Structure, Lattice), imported by matgl
    monty==2026.10.21           # needed by pymatgen-core
    ruamel.yaml==0.19.1         # needed by monty.serialization
    orjson==3.13.0              # needed by pymatgen.core (compiled)
    ase==3.29.0
    hydra-core==1.3.8
    omegaconf==2.3.1
    vesin==0.6.2                # periodic neighbour list (compiled)
)
# antlr4-python3-runtime 4.9.x (hydra-core 1.3 / omegaconf 2.3 need exactly 4.9) is published as an
# sdist only: build its pure-Python wheel here.
SDIST_ONLY=(antlr4-python3-runtime==4.9.3)

mkdir -p "$WHEEL_DIR"
rm -f "$WHEEL_DIR"/*.whl   # exactly this set: two versions of one package stop the install there
platforms=()
for tag in manylinux_2_28 manylinux_2_27 manylinux_2_24 manylinux_2_17 manylinux2014 manylinux1; do
    platforms+=(--platform "${tag}_x86_64")
done
"$PYTHON" -m pip download -q --no-deps --only-binary=:all: --python-version "$WHEEL_PYTHON" \
    --implementation cp "${platforms[@]}" -d "$WHEEL_DIR" "${PACKAGES[@]}"
"$PYTHON" -m pip wheel -q --no-deps --no-binary=:all: -w "$WHEEL_DIR" "${SDIST_ONLY[@]}"

ls -1 "$WHEEL_DIR"/*.whl
echo "$(ls "$WHEEL_DIR"/*.whl | wc -l) wheels, $(du -ch "$WHEEL_DIR"/*.whl | tail -n 1 | cut -f1) in total"
