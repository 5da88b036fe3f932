#!/usr/bin/env bash
# GPU benchmarks (issue 7), one command on a CUDA machine, from anywhere; uses .venv when it exists.
#   bench/gpu.sh            -> bench/results/tag-<device>.json, rollout-<device>.json, trainer-<device>.json
# First the rollout tests (the compiled static-cache path is checked against eager on the GPU), then:
#   tagging   Qwen2-1.5B-shaped proxy, random weights, bf16, 4k-token windows: run_tag vs naive logits, MFU
#   rollouts  Qwen2-0.5B-shaped policy, random weights, bf16, 64 prompts x 512 new tokens: HFRollout vs generate
#   trainer   the same policy, 8 prompts x G=8, 512 new tokens: rpt_train vs TRL GRPOTrainer, split per phase
# Not yet run on a GPU (written in a session without one). Extra arguments go to every benchmark script.
set -u
cd "$(dirname "$0")/.."
PY=python
[ -x .venv/bin/python ] && PY=.venv/bin/python
$PY -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" \
  || { echo "error: bench/gpu.sh needs a CUDA device (CPU numbers: make bench-cpu)" >&2; exit 2; }
$PY -c "import trl" 2>/dev/null || $PY -m pip install -q "trl>=1.16" || exit 2
rc=0
$PY -m pytest tests/test_train_rollout.py -m "gpu or not gpu" -q -p no:cacheprovider || rc=$?
for b in tag rollout trainer; do
  echo "== bench/$b.py --preset gpu $* ==" >&2
  $PY bench/$b.py --preset gpu "$@" || rc=$?
done
exit $rc
