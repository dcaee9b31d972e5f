#!/usr/bin/env bash
# FLUX.1-dev-sized generation and LoRA training on one GPU: step time, peak memory and
# TFLOP/s at 512² and 1024² with 0, 2 and 4 references (bench/gpu_bench.py has the details).
#
#   bash bench/gpu.sh                      # everything, a few minutes on an H100/H200
#   bash bench/gpu.sh --peak-tflops 400    # a device missing from the script's peak table
#
# Needs torch with CUDA, diffusers and peft. Python: $PYTHON, else the project's .venv, else
# python3. The hard limit keeps the run under 8 minutes even if a step hangs; the script's
# own --budget-s (420 s) stops starting new rows before that.
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-}
if [[ -z "$PY" ]]; then
    if [[ -x .venv/bin/python ]]; then PY=.venv/bin/python; else PY=python3; fi
fi
if ! "$PY" -c "import torch, diffusers, peft" 2>/dev/null; then
    echo "gpu.sh: $PY lacks torch, diffusers or peft (pip install 'diffusers>=0.42,<0.43' peft)" >&2
    exit 2
fi
"$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" || {
    echo "gpu.sh: no CUDA device visible to $PY; on a CPU run: $PY bench/gpu_bench.py --tiny" >&2
    exit 2
}

export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
exec timeout --signal=INT --kill-after=20 470 "$PY" bench/gpu_bench.py "$@"
