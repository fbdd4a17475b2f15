#!/usr/bin/env bash
# Every check that needs a GPU, in one short run (about 8 minutes on one H100) — for a machine with
# a GPU and PyTorch already installed, no venv, no MPI launcher needed:
#   bash scripts/gpu_check.sh [OUT_DIR]
# It runs the `gpu`-marked tests (bf16 + torch.compile training with resume, CUDA-graph decode), then
# `hpcllm bench train --device cuda` (GPT-2 124M, bf16, compiled, beside nanoGPT's loop) and
# `hpcllm bench infer --device cuda` for GPT-2 124M and the Llama-3.2-1B shape (bf16, batch 256,
# 128 + 128 tokens; beside HF generate with its dynamic and static caches).
# Each part has its own time limit, so one that hangs cannot eat the others' time; every log lands
# in OUT_DIR. Record the figures in docs/performance.md with the device, commit and date.
set -uo pipefail
out=${1:-${OUT:-gpu-check}}
mkdir -p "$out"
cd "$(dirname "$0")/.."
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
py=${PYTHON:-python3}
status=0

part() {  # part NAME LIMIT_S CMD...: run, log to OUT/NAME.txt, remember a failure
    local name=$1 limit=$2
    shift 2
    echo "== $name ($(date -u +%H:%M:%S), limit ${limit}s): $*" | tee "$out/$name.txt"
    timeout "$limit" "$@" 2>&1 | tee -a "$out/$name.txt"
    local rc=${PIPESTATUS[0]}
    echo "== $name: exit $rc" | tee -a "$out/$name.txt"
    [ "$rc" = 0 ] || status=1
}

part env 60 bash -c "nvidia-smi; git log -1 --format='commit %H %cd' 2>/dev/null; $py -c 'import torch; print(\"torch\", torch.__version__, torch.cuda.get_device_name())'"
part pytest-gpu 300 "$py" -m pytest -q -m gpu -p no:cacheprovider tests/train/test_trainer.py tests/infer/test_engine.py
part bench-train 240 "$py" -m hpcllm.cli bench train --device cuda --rounds 3
part bench-infer 150 "$py" -m hpcllm.cli bench infer --device cuda --model gpt2 --batch-size 256 --prompt-len 128 --new-tokens 128
part bench-infer-llama 240 "$py" -m hpcllm.cli bench infer --device cuda --arch llama --model llama3.2-1b --batch-size 256 --prompt-len 128 --new-tokens 128
exit $status
