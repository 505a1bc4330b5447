#!/usr/bin/env bash
# bench/gpu_learner.py on a bare GPU box (torch and transformers, nothing installed), in one call.
# Liger comes along as a wheel, unzipped onto the path. Fetch it first, on a machine with PyPI:
#     pip download liger-kernel==0.8.5 --no-deps -d bench/wheels
# then copy the repository (with bench/wheels/) to the GPU box and run `bash bench/gpu_device.sh`.
# Figures go to $OUT/gpu_learner.json when OUT is set, else bench/results/gpu_learner.json.
set -euo pipefail
cd "$(dirname "$0")/.."
py=${PYTHON:-python3}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
for wheel in bench/wheels/liger_kernel-*.whl; do
  if [ -f "$wheel" ]; then
    "$py" -m zipfile -e "$wheel" /tmp/liger-kernel
    export PYTHONPATH="$PYTHONPATH:/tmp/liger-kernel"
  fi
done
nvidia-smi -L || true
"$py" bench/gpu_learner.py --budget-s "${BUDGET_S:-420}" --out "${OUT:-bench/results}/gpu_learner.json" "$@"
