#!/usr/bin/env bash
# First contact with a GPU (issue 37): one command, under 9 minutes on one H200, on a machine with no network.
#   bench/gpu.sh                 everything below; files go to $OUT (the lent device) or bench/results/ elsewhere
#   bench/gpu.sh --only a,b      only these parts (pytest, kernel, tag, rollout, step): a rerun of what failed
#   bench/gpu.sh --dry-run       on CPU: imports of the GPU path vs image + wheels, carried size (bench/gpu_dry_run.py)
# Setup: the carried wheels of .whl/ (`make gpu-wheels`) go into a target directory with --no-index --no-deps, the
# project and that directory go on PYTHONPATH (no `pip install -e`: its torch pin is not the image's), and the demo
# tokenizer + CHAMP from .whl/assets.tar.gz become RPT_CACHE_DIR (random weights: speed only). Then, each part under
# its own `timeout` (and the whole under GPU_BUDGET_S), each writing its file as it finishes:
#   pytest   pytest -m gpu on the test files with a gpu mark          -> pytest-gpu-<device>.xml
#   kernel   bench/kernel.py --no-compile: bandwidth vs copy and torch -> kernel-<device>.json
#   tag      bench/tag.py --preset gpu (1.5B-shaped proxy, bf16, 4k)    -> tag-<device>.json
#   rollout  bench/rollout.py --preset gpu vs HF generate               -> rollout-<device>.json
#   step     bench/step.py: C=1024, G=16, shared prefix vs TRL          -> step-<device>.json
# and gpu-summary-<device>.json (per part: rc, seconds, limit, timed_out; pytest counts) after every part, and the
# whole log in gpu-<device>.log. Limits (s): GPU_T_PYTEST, GPU_T_KERNEL, GPU_T_TAG, GPU_T_ROLLOUT, GPU_T_STEP;
# extra arguments per script: GPU_ARGS_KERNEL, GPU_ARGS_TAG, GPU_ARGS_ROLLOUT, GPU_ARGS_STEP. Exit: 0 when every
# selected part passed, 1 when one failed or timed out, 2 when nothing could run. GPU_PYTHON: another interpreter;
# GPU_WHEELS: another wheel directory; GPU_WORK: the scratch directory (default $TMPDIR/rpt-gpu).
set -u
REPO=$(cd "$(dirname "$0")/.." && pwd)
cd "$REPO" || exit 2
PARTS="pytest kernel tag rollout step"
ONLY=""
DRY=0
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) DRY=1 ;;
    --only) shift; ONLY=$(echo "${1:-}" | tr ',' ' ') ;;
    --only=*) ONLY=$(echo "${1#--only=}" | tr ',' ' ') ;;
    -h|--help) sed -n '2,18p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "bench/gpu.sh: unknown argument '$1' (see --help)" >&2; exit 2 ;;
  esac
  shift
done
for p in $ONLY; do
  case " $PARTS " in *" $p "*) ;; *) echo "bench/gpu.sh: unknown part '$p' (parts: $PARTS)" >&2; exit 2 ;; esac
done

PY=python3
[ -z "${OUT:-}" ] && [ -x .venv/bin/python ] && PY=.venv/bin/python
PY=${GPU_PYTHON:-$PY}  # the interpreter that holds torch (the device's python3 by default)
if [ "$DRY" = 1 ]; then
  [ -x .venv/bin/python ] && PY=.venv/bin/python  # maps imports to distributions through installed metadata
  exec "$PY" bench/gpu_dry_run.py
fi

START=$(date +%s)
BUDGET=${GPU_BUDGET_S:-530}
WORK=${GPU_WORK:-${TMPDIR:-/tmp}/rpt-gpu}
DEST=${OUT:-$REPO/bench/results}
mkdir -p "$WORK" "$DEST" || exit 2
BOOT_LOG="$WORK/boot.log"
: >"$BOOT_LOG"
LOG=$BOOT_LOG  # until the device is named
say() { echo "[gpu.sh $(( $(date +%s) - START ))s] $*" | tee -a "$LOG" >&2; }
boot_failed() { say "error: $*"; [ -n "${OUT:-}" ] && cp "$BOOT_LOG" "$OUT/gpu-boot.log"; tail -n 40 "$BOOT_LOG" >&2; exit 2; }

WHL=${GPU_WHEELS:-.whl}  # the carried wheels and assets (`make gpu-wheels`)
if ls "$WHL"/*.whl >/dev/null 2>&1; then
  say "installing $(ls "$WHL"/*.whl | wc -l) carried wheels into $WORK/site (--no-index --no-deps)"
  "$PY" -m pip install -q --disable-pip-version-check --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target "$WORK/site" "$WHL"/*.whl >>"$BOOT_LOG" 2>&1 || boot_failed "wheel install failed"
  export PYTHONPATH="$REPO:$WORK/site${PYTHONPATH:+:$PYTHONPATH}"
else
  say "no wheels in $WHL/ (make gpu-wheels): using $PY's own packages"
  export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
if [ -f "$WHL/assets.tar.gz" ]; then
  export RPT_CACHE_DIR="$WORK/cache"
  "$PY" bench/gpu_assets.py unpack --archive "$WHL/assets.tar.gz" --cache "$RPT_CACHE_DIR" >>"$BOOT_LOG" 2>&1 \
    || boot_failed "could not unpack $WHL/assets.tar.gz"
fi
# GPU_PLUMBING_ON_CPU=1: run the parts on a CPU anyway (they fail or skip at once) to check this script's plumbing
SLUG=$("$PY" -c "import os, re, torch; cpu = os.environ.get('GPU_PLUMBING_ON_CPU') == '1'; \
assert cpu or torch.cuda.is_available(); \
print('cpu-plumbing' if cpu else re.sub('[^a-z0-9]+', '-', torch.cuda.get_device_name().lower()).strip('-'))" \
  2>>"$BOOT_LOG") || boot_failed "no CUDA device visible to $PY (CPU checks: bench/gpu.sh --dry-run)"
LOG="$DEST/gpu-$SLUG.log"
SUMMARY="$DEST/gpu-summary-$SLUG.json"
cp "$BOOT_LOG" "$LOG"
{
  echo "== environment"
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv 2>&1
  "$PY" -c "import sys, torch, triton, transformers; print(sys.version.split()[0], 'torch', torch.__version__, \
'cuda', torch.version.cuda, 'triton', triton.__version__, 'transformers', transformers.__version__)" 2>&1
  "$PY" -m pip list --disable-pip-version-check 2>/dev/null \
    | grep -i -E '^(torch|triton|transformers|accelerate|pyarrow|fsspec|huggingface.hub|numpy|pandas|tokenizers) '
} >>"$LOG" 2>&1
"$PY" bench/gpu_summary.py init "$SUMMARY" --budget "$BUDGET" --parts "${ONLY:-$PARTS}" >>"$LOG" 2>&1

FAILED=0
run_part() {  # run_part NAME LIMIT RESULT-FILE CMD...
  local name=$1 limit=$2 result=$3
  shift 3
  if [ -n "$ONLY" ]; then case " $ONLY " in *" $name "*) ;; *) return 0 ;; esac; fi
  local left=$(( BUDGET - ($(date +%s) - START) ))
  [ "$limit" -gt "$left" ] && limit=$left
  if [ "$limit" -lt 20 ]; then
    say "$name: not started: limit ${limit}s (its GPU_T_* or the ${left}s left of GPU_BUDGET_S) is under 20s"
    "$PY" bench/gpu_summary.py record "$SUMMARY" "$name" --rc 124 --seconds 0 --limit 0 >>"$LOG" 2>&1
    FAILED=1
    return 0
  fi
  say "$name: start (limit ${limit}s): $*"
  rm -f "$result"  # a file from an earlier run must not pass for this one's
  local t0 rc
  t0=$(date +%s)
  timeout -k 15 "$limit" "$@" 2>&1 | tee -a "$LOG"
  rc=${PIPESTATUS[0]}
  say "$name: rc $rc after $(( $(date +%s) - t0 ))s"
  "$PY" bench/gpu_summary.py record "$SUMMARY" "$name" --rc "$rc" --seconds $(( $(date +%s) - t0 )) \
    --limit "$limit" --result "$result" >>"$LOG" 2>&1
  [ "$rc" = 0 ] || FAILED=1
}

# shellcheck disable=SC2046,SC2086  # word splitting of the file list and of the extra arguments is intended
{
run_part pytest "${GPU_T_PYTEST:-150}" "$DEST/pytest-gpu-$SLUG.xml" \
  "$PY" -m pytest -m gpu -p no:cacheprovider -q -rs --junitxml="$DEST/pytest-gpu-$SLUG.xml" \
  $("$PY" bench/gpu_dry_run.py --list-tests)
run_part kernel "${GPU_T_KERNEL:-60}" "$DEST/kernel-$SLUG.json" \
  "$PY" bench/kernel.py --no-compile --out "$DEST/kernel-$SLUG.json" ${GPU_ARGS_KERNEL:-}
run_part tag "${GPU_T_TAG:-100}" "$DEST/tag-$SLUG.json" \
  "$PY" bench/tag.py --preset gpu --device cuda --repeat 3 --reps 2 --out "$DEST/tag-$SLUG.json" ${GPU_ARGS_TAG:-}
run_part rollout "${GPU_T_ROLLOUT:-110}" "$DEST/rollout-$SLUG.json" \
  "$PY" bench/rollout.py --preset gpu --device cuda --reps 2 --max-new-tokens 256 --no-hf-static \
  --out "$DEST/rollout-$SLUG.json" ${GPU_ARGS_ROLLOUT:-}
run_part step "${GPU_T_STEP:-80}" "$DEST/step-$SLUG.json" \
  "$PY" bench/step.py --device cuda --model demo --shapes 1024:12:16 --trl-shape 1024:12:16 --trl-steps 2 \
  --out "$DEST/step-$SLUG.json" ${GPU_ARGS_STEP:-}
}
say "done in $(( $(date +%s) - START ))s; summary $SUMMARY"
cat "$SUMMARY"
exit $FAILED
