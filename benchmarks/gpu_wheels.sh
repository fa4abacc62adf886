#!/usr/bin/env bash
# The Python packages fusar-edge needs that a bare GPU image (Python 3.12, torch, Triton,
# onnxruntime) lacks, as files to carry to it: rasterio (its wheel recompressed with xz: 39 MB ->
# 29 MB, so that it fits with the repo into a 64 MiB transfer), affine, and the transformers the
# project pins (5.24). Written to .whl/ (git-ignored). Run on a connected machine:
#
#     benchmarks/gpu_wheels.sh [PYTHON_VERSION]      # default 3.12
#
# then, on the GPU machine, from the repo root (what benchmarks/results/gpu-h200.md ran):
#
#     mkdir -p /tmp/site && tar -xJf .whl/rasterio.tar.xz -C /tmp/site \
#       && python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl \
#       && export PYTHONPATH=/tmp/site:$PWD \
#       && python3 -m pip install -q --no-deps --no-index --no-build-isolation -e . \
#       && benchmarks/gpu_check.sh OUT 480
set -euo pipefail
cd "$(dirname "$0")/.."
PYV=${1:-3.12}
mkdir -p .whl
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
get() {
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$PYV" --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        -d "$1" "${@:2}"
}
get "$tmp" rasterio
mkdir "$tmp/site"
unzip -q "$tmp"/rasterio-*.whl -d "$tmp/site"  # unzip keeps the libraries' file modes
tar -cf - -C "$tmp/site" . | xz -T0 -6 > .whl/rasterio.tar.xz
get .whl affine "transformers==5.24.0"
ls -l .whl
