#!/usr/bin/env bash
# An offline wheelhouse for fusar-edge, made on a machine with network access:
#
#   scripts/make_wheelhouse.sh WHEELHOUSE [EXTRAS]      # EXTRAS e.g. "serve" or "torch,serve"
#
# then, on the machine without network (same OS, CPU architecture and Python version):
#
#   python3 -m venv .venv && . .venv/bin/activate
#   pip install --no-index --find-links WHEELHOUSE fusar-edge          # the edge runtime, no torch
#   pip install --no-index --find-links WHEELHOUSE "fusar-edge[serve]"  # if EXTRAS had serve
#
# fusar-edge's own wheel is built here (with the tile store's C reader when a compiler is
# present); every dependency is downloaded as a wheel. tests/test_edge_runtime.py runs this
# script and the offline install end to end.
set -euo pipefail
out=${1:?usage: scripts/make_wheelhouse.sh WHEELHOUSE [EXTRAS]}
extras=${2:-}
root="$(cd "$(dirname "$0")/.." && pwd)"
spec="$root"
[ -n "$extras" ] && spec="$root[$extras]"
mkdir -p "$out"
python -m pip wheel --quiet --no-deps --wheel-dir "$out" "$root"
python -m pip download --quiet --only-binary=:all: --dest "$out" "$spec"
echo "wheelhouse: $out ($(ls "$out" | wc -l) wheels)"
