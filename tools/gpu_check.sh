#!/usr/bin/env bash
# One short run on a CUDA machine that exercises r1mega's GPU paths: megatron-core's local layers on
# CUDA (bf16), the Transformer Engine layer spec (bf16), and FP8 through TE, a few training steps each
# of the tiny MoE + MLA model. Prints one summary line per run; exits non-zero if any run fails.
#
#   bash tools/gpu_check.sh            # from the repo root, after `pip install -e '.[gpu]'`
#   STEPS=20 bash tools/gpu_check.sh
#
# Without CUDA it says so and exits 2; without Transformer Engine the TE and FP8 runs report SKIP.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 2
STEPS=${STEPS:-10}
OUT=${OUT:-$(mktemp -d)}
PY=${PYTHON:-python3}

if ! "$PY" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)'; then
  echo "gpu_check: no CUDA device visible to $PY; nothing to check" >&2
  exit 2
fi
"$PY" - <<'PY'
import torch
print(f"gpu_check: torch {torch.__version__}, {torch.cuda.get_device_name(0)}, CUDA {torch.version.cuda}")
try:
    import transformer_engine, transformer_engine.pytorch  # noqa: F401
    print(f"gpu_check: transformer_engine {transformer_engine.__version__}")
except Exception as e:  # TE raises RuntimeError, not ImportError, when its CUDA libraries are missing
    print(f"gpu_check: transformer_engine unavailable: {type(e).__name__}: {str(e).splitlines()[0]}")
PY
HAVE_TE=$("$PY" -c 'import transformer_engine.pytorch' >/dev/null 2>&1 && echo 1 || echo 0)

# FP8 GEMMs need every dimension divisible by 16: the MLA latent + RoPE width is made 64.
COMMON=(parallel.world_size=null "optim.train_steps=$STEPS" optim.lr=3e-3 data.seq_length=128
        optim.micro_batch_size=4 optim.global_batch_size=8 logging.progress_bar=false logging.tensorboard=false
        model.kv_lora_rank=48 model.qk_pos_emb_head_dim=16)
status=0
run() {
  local name=$1; shift
  if [[ $name != local-bf16 && $HAVE_TE != 1 ]]; then echo "gpu_check: $name SKIP (no Transformer Engine)"; return; fi
  local log="$OUT/$name.log"
  if "$PY" -m r1mega.cli.train "${COMMON[@]}" "run_dir=$OUT/$name" "$@" >"$log" 2>&1; then
    local first last tps
    first=$(grep -o 'lm_loss=[0-9.naninf]*' "$log" | head -1); last=$(grep -o 'lm_loss=[0-9.naninf]*' "$log" | tail -1)
    tps=$(grep -o 'tokens_per_s=[0-9.e+]*' "$log" | tail -1)
    echo "gpu_check: $name OK  first $first  last $last  $tps"
  else
    echo "gpu_check: $name FAILED (log $log):"; tail -25 "$log"; status=1
  fi
}
run local-bf16 precision=bf16 precision.transformer_impl=local
run te-bf16 precision=bf16 precision.transformer_impl=transformer_engine
run te-fp8 precision=fp8
exit $status
