#!/usr/bin/env bash
# The whole test run, as `make test` calls it. Every stage must collect tests and pass:
# pytest exits 5 when it collects nothing, and `set -e` turns that into a failure.
set -euo pipefail
PY=${1:-python}
cd "$(dirname "$0")/.."

echo "== 1/4 CPU tests (JIT on)"
"$PY" -m pytest -q tests -m "not sim and not ptx and not gpu and not notebook" -p no:cacheprovider

echo "== 2/4 CUDA kernels under the simulator (own process, tiny shapes and tiles)"
NUMBA_ENABLE_CUDASIM=1 "$PY" -m pytest -q tests -m sim -p no:cacheprovider

echo "== 3/4 every real CUDA kernel compiled to PTX for cc 9.0"
"$PY" -m pytest -q tests -m ptx -p no:cacheprovider

echo "== 4/4 notebooks executed"
"$PY" -m pytest -q tests -m notebook -p no:cacheprovider
