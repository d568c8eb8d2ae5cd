#!/usr/bin/env bash
# The GPU checks, as one script short enough to run twice in a 15-minute GPU lease (~6 minutes):
#   1. the GPU-only tests (`pytest -m gpu`: DeepSpeed ZeRO on CUDA; the vLLM ones skip where vLLM
#      is not installed);
#   2. benchmarks/bench_train.py on CUDA in bf16, against TRL at its best, with MFU, for
#      SmolLM2-135M-Instruct (the bundled weights) and a SmolLM2-1.7B-shaped model with random weights.
#
#   bash benchmarks/gpu_check.sh [OUT_DIR]          # default: $OUT, else runs/gpu-check
#
# Each part has its own time limit, so a slow part cannot starve the rest; every log and the
# RESULT lines land in OUT_DIR (results.txt collects them). The environment must already hold
# the package's dependencies: on a bare GPU machine with PyTorch but no network, install the
# wheels that `benchmarks/gpu_wheels.sh` downloads on a machine with one (see that script).
set -uo pipefail

out=${1:-${OUT:-runs/gpu-check}}
mkdir -p "$out"
python=${PYTHON:-python3}
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

if ! "$python" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "gpu_check: no CUDA device visible to $python; nothing to measure" >&2
    exit 2
fi
nvidia-smi > "$out/nvidia-smi.txt" 2>&1 || true

part() {  # part NAME SECONDS COMMAND...: run one part under its limit, log to OUT_DIR/NAME.log
    local name=$1 limit=$2
    shift 2
    local t0=$SECONDS
    timeout "$limit" "$@" > "$out/$name.log" 2>&1
    local rc=$?
    echo "$name: exit $rc in $((SECONDS - t0)) s (limit $limit s)" | tee -a "$out/results.txt"
    grep '^RESULT ' "$out/$name.log" | sed "s/^/$name /" >> "$out/results.txt"
}

part gpu-tests 120 "$python" -m pytest -m gpu -q -p no:cacheprovider tests
part bench-train-135m 90 "$python" benchmarks/bench_train.py --device cuda --dtype bfloat16 --model smollm2
part bench-train-1.7b 150 "$python" benchmarks/bench_train.py --device cuda --dtype bfloat16 \
    --model random-smollm2-1.7b
cat "$out/results.txt"
