#!/usr/bin/env bash
# The one GPU command: r1mega's single-GPU path tested and measured in about 8 minutes on one CUDA GPU.
#
#   bash tools/gpu_prepare.sh                      # on the CPU machine: wheels into .whl/, test data into .gpu_data/
#   bash tools/gpu_check.sh                        # on the GPU machine (the device tool carries .whl and .gpu_data)
#   PARTS="tests train" bash tools/gpu_check.sh    # a subset: env, tests, train, rollout
#
# 1. installs the carried wheels (megatron-core, hydra, math-verify, reasoning-gym...) into /tmp/site when the
#    machine lacks them; 2. `pytest -m gpu tests/gpu`; 3. bench/gpu_train.py (bf16 matmul and copy ceilings,
#    dense Qwen2-proxy MFU, dsv3-proxy MFU with SequentialMLP and with grouped experts (a time breakdown), FP8/bf16
#    step time and loss); 4. the rollout
#    benchmark against Hugging Face `generate` on the same weights. Logs go to $OUT/gpu_check/ (a temporary
#    folder without OUT); the summary table is printed last. Each part has its own time limit and a failing
#    part does not stop the others; the exit code is non-zero if any part failed.
#
# Transformer Engine is not installed on the lent H200 (CUDA 12 wheels of 729 MB, CUDA 13 there), so the TE layer
# spec and TE FP8 are not exercised here; FP8 runs through torch's blockwise scaled matmul (precision.fp8_backend).
set -uo pipefail
cd "$(dirname "$0")/.." || exit 2
PY=${PYTHON:-python3}
OUT=${OUT:-$(mktemp -d)}
LOGS="$OUT/gpu_check"
mkdir -p "$LOGS"
PARTS=${PARTS:-"env tests train rollout"}
T_TESTS=${T_TESTS:-210}
T_TRAIN=${T_TRAIN:-215}
T_ROLLOUT=${T_ROLLOUT:-180}
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
START=$(date +%s)
elapsed() { echo $(($(date +%s) - START)); }

TRAIN_ARGS=${TRAIN_ARGS:-}
ROLLOUT_ARGS=${ROLLOUT_ARGS:---preset h200}
# GPU_CHECK_DRY_RUN=1 runs the plumbing on a CPU (tests skip; give CPU-sized TRAIN_ARGS / ROLLOUT_ARGS).
if [ "${GPU_CHECK_DRY_RUN:-0}" != 1 ] && ! "$PY" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)'; then
  echo "gpu_check: no CUDA device visible to $PY; nothing to check" >&2
  exit 2
fi

# ---- 1. what the machine lacks travels as wheels (tools/gpu_prepare.sh) ------------------------------------
if ! "$PY" -c 'import megatron.core, hydra, math_verify' 2>/dev/null; then
  if [ ! -d .whl ]; then
    echo "gpu_check: megatron-core/hydra/math-verify missing and no .whl/ carried (run tools/gpu_prepare.sh)" >&2
    exit 2
  fi
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    >"$LOGS/pip.log" 2>&1 || { echo "gpu_check: wheel install failed"; tail -20 "$LOGS/pip.log"; exit 2; }
  # reasoning-gym imports pycosat, published as source only: build it here if a compiler is at hand.
  if ls .whl/pycosat-*.tar.gz >/dev/null 2>&1; then
    "$PY" -m pip install -q --no-index --no-deps --no-cache-dir --target /tmp/site .whl/pycosat-*.tar.gz \
      >>"$LOGS/pip.log" 2>&1 || echo "gpu_check: pycosat did not build (reasoning-gym unavailable; tests use .gpu_data)"
  fi
fi
export PYTHONPATH="/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
[ -f .gpu_data/train.jsonl ] && export R1MEGA_GPU_DATA="$PWD/.gpu_data"

status=0
declare -A RESULT
part() { [[ " $PARTS " == *" $1 "* ]]; }

# ---- 2. environment -----------------------------------------------------------------------------------------
if part env; then
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv >"$LOGS/env.log" 2>&1
  "$PY" - >>"$LOGS/env.log" 2>&1 <<'PY'
import platform, torch
print(f"python {platform.python_version()} torch {torch.__version__} cuda {torch.version.cuda} "
      f"device {torch.cuda.get_device_name(0)} capability {torch.cuda.get_device_capability(0)}")
for name in ("megatron.core", "transformers", "hydra", "transformer_engine"):
    try:
        module = __import__(name, fromlist=["__version__"])
        print(f"{name} {getattr(module, '__version__', '?')}")
    except Exception as e:  # TE raises RuntimeError, not ImportError, without its CUDA libraries
        print(f"{name} unavailable: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
import logging

logging.basicConfig(level=logging.INFO, format="%(message)s")  # fp8_gemm_path logs why a path was not taken
try:
    from r1mega.models.fp8 import fp8_gemm_path
    print(f"fp8 gemm path: {fp8_gemm_path()}")
except Exception as e:
    print(f"fp8 gemm path unavailable: {type(e).__name__}: {e}")
PY
  cat "$LOGS/env.log"
fi

# ---- 3. the GPU tests ---------------------------------------------------------------------------------------
if part tests; then
  # The tests mostly wait on process start-up and tiny kernels: run them side by side when pytest-xdist is there.
  XDIST=()
  "$PY" -c 'import xdist' 2>/dev/null && XDIST=(-n "${GPU_TEST_WORKERS:-6}")
  timeout -k 10 "$T_TESTS" "$PY" -m pytest -m gpu tests/gpu -q -p no:cacheprovider --durations=12 "${XDIST[@]}" \
    --junitxml="$LOGS/pytest.xml" >"$LOGS/pytest.log" 2>&1
  rc=$?
  RESULT[tests]="$(grep -E '(passed|failed|error|skipped|no tests ran)' "$LOGS/pytest.log" | tail -1) (rc=$rc, $(elapsed) s)"
  [ $rc -ne 0 ] && status=1
  echo "gpu_check: tests: ${RESULT[tests]}"
  grep -E '^(FAILED|ERROR)' "$LOGS/pytest.log" | head -20
fi

# ---- 4. training speed: ceilings, MFU, FP8 ------------------------------------------------------------------
if part train; then
  timeout -k 10 "$T_TRAIN" "$PY" bench/gpu_train.py --out "$LOGS/train" $TRAIN_ARGS >"$LOGS/train.log" 2>&1
  rc=$?
  RESULT[train]="rc=$rc ($(elapsed) s)"
  [ $rc -ne 0 ] && status=1
  echo "gpu_check: train bench rc=$rc"
fi

# ---- 5. rollout speed against Hugging Face generate ---------------------------------------------------------
if part rollout; then
  timeout -k 10 "$T_ROLLOUT" "$PY" bench/rollout_throughput.py $ROLLOUT_ARGS >"$LOGS/rollout.log" 2>&1
  rc=$?
  RESULT[rollout]="rc=$rc ($(elapsed) s)"
  [ $rc -ne 0 ] && status=1
  echo "gpu_check: rollout bench rc=$rc"
fi

# ---- summary (last, so it is what a truncated output keeps) -------------------------------------------------
echo
echo "==================== gpu_check summary ($(elapsed) s, logs in $LOGS) ===================="
[ -f "$LOGS/env.log" ] && grep -E '^(python|fp8 gemm path|transformer_engine)' "$LOGS/env.log"
for key in tests train rollout; do
  [ -n "${RESULT[$key]:-}" ] && echo "$key: ${RESULT[$key]}"
done
if [ -f "$LOGS/pytest.log" ]; then
  grep -E '^(FAILED|ERROR)' "$LOGS/pytest.log" | cut -c1-200 | head -12
fi
for log in train rollout; do
  if [ -f "$LOGS/$log.log" ]; then
    # Each benchmark ends with its own table; a failed one shows its last lines instead.
    sed -n '/^=== /,$p' "$LOGS/$log.log" | tail -40
    grep -qE '^=== ' "$LOGS/$log.log" || tail -15 "$LOGS/$log.log"
  fi
done
# Everything in one archive beside the main logs (the device tool brings back at most 8 files).
tar czf "$OUT/gpu_check_logs.tgz" -C "$OUT" gpu_check 2>/dev/null &&
  find "$LOGS" -mindepth 1 \( -type d -o ! -name '*.log' -o -name pip.log \) -prune -exec rm -rf {} +
exit $status
