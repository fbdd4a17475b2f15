#!/usr/bin/env bash
# The largest model that trains within a per-rank memory cap, per sharding mode (issue 13): GPT
# models of growing depth (n_embd 1024, byte vocabulary) trained 2 steps on N ranks in each
# parallel.shard mode, batch 1 x 128 with activation checkpointing; each run's end-of-run line gives
# rank 0's measured parameters, gradients, optimizer state and peak RSS, beside `hpcllm plan`'s
# estimate. docs/performance.md keeps the table.
#   [MODES="none optimizer full"] bash scripts/memory_ladder.sh [OUT_DIR] [RANKS] [LAYERS...]
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-runs/memory-ladder}
ranks=${2:-2}
shift $(( $# > 2 ? 2 : $# ))
layers=("$@")
[ ${#layers[@]} -gt 0 ] || layers=(4 8 16 24)
py=${PYTHON:-.venv/bin/python}
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 OMP_NUM_THREADS=1
mkdir -p "$out"
if [ ! -d "$out/ds" ]; then
  mkdir -p "$out/corpus"
  cp "$($py -c 'import email, os; print(os.path.dirname(email.__file__))')"/*.py "$out/corpus/"
  printf '{"kind": "prepare", "run_dir": "%s", "data": {"inputs": ["%s"], "dataset": "%s"}}\n' \
    "$out/prep" "$out/corpus" "$out/ds" > "$out/prep.yaml"
  $py -m hpcllm.cli prepare "$out/prep.yaml" > /dev/null 2>&1
fi
printf 'mode\tn_layer\tparams_M\tparams_MB\tgrads_MB\toptimizer_MB\tpeak_rss_MB\n'
for L in "${layers[@]}"; do
  for mode in ${MODES:-none optimizer full}; do
    backend=mpi; [ "$mode" = full ] && backend=torch
    run="$out/$mode-$L"
    rm -rf "$run"
    printf '{"kind": "train", "name": "ladder", "run_dir": "%s", "data": {"dataset": "%s"},
      "dist": {"backend": "%s", "timeout_s": 600},
      "model": {"size": "custom", "n_layer": %d, "n_head": 16, "n_embd": 1024, "block_size": 128},
      "parallel": {"shard": "%s"},
      "train": {"max_steps": 2, "batch_size": 1, "seq_len": 128, "log_interval": 1, "eval_interval": 0,
                "ckpt_interval": 0, "activation_checkpointing": true, "progress": false}}\n' \
      "$run" "$out/ds" "$backend" "$L" "$mode" > "$out/$mode-$L.yaml"
    if ! mpirun -np "$ranks" --oversubscribe --bind-to none $py -m hpcllm.cli train "$out/$mode-$L.yaml" \
        > "$run.log" 2>&1; then
      printf '%s\t%d\tfailed (see %s)\n' "$mode" "$L" "$run.log"
      continue
    fi
    $py - "$run" "$mode" "$L" <<'EOF'
import json, re, sys
from pathlib import Path
run, mode, layers = sys.argv[1:]
last = json.loads((Path(run) / "metrics.jsonl").read_text().splitlines()[-1])
params = re.search(r"model ([0-9.]+)M params", Path(run + ".log").read_text()).group(1)
mb = lambda k: f"{last[k] / 2**20:.0f}"
print(f"{mode}\t{layers}\t{params}\t{mb('params_bytes')}\t{mb('grads_bytes')}\t{mb('optimizer_bytes')}\t"
      f"{mb('peak_bytes')}", flush=True)
EOF
    rm -rf "$run/checkpoints"  # GBs each: the figures are in metrics.jsonl and the log
  done
done
