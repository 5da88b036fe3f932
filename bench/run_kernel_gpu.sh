#!/usr/bin/env bash
# GPU checks of the fused token_stats kernel (issue 3): every test of tests/test_kernel.py (on a CUDA
# machine the CPU-interpreter cases run the compiled kernel on the GPU) including the GPU-only ones,
# then the benchmark (writes bench/results/kernel-<device>.json). Extra arguments go to the benchmark.
# Run from anywhere; uses .venv when it exists.
set -u
cd "$(dirname "$0")/.."
PY=python
[ -x .venv/bin/python ] && PY=.venv/bin/python
$PY -m pytest tests/test_kernel.py -m "gpu or not gpu" -p no:cacheprovider; rc=$?
$PY bench/kernel.py "$@" || rc=$?
exit $rc
