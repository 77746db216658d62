#!/usr/bin/env bash
# The GPU measurements of the open AdaptCLIP and MuSc targets, as ONE command for a lent GPU
# machine (about 7 minutes on one H200; each step has its own timeout so a slow step cannot
# eat the others' time).
#
#   1. benchmarks/adaptclip_speed.py: ViT-L/14@518 (random weights: speed does not depend on
#      them), zero-shot and 1-shot, batch 1 / 8 / 32, fp32 and bf16, plus the largest bf16-vs-
#      fp32 difference of the fused maps. Target: 1-shot bf16 >= 300 img/s, maps within 1e-2.
#   2. benchmarks/musc_scale.py at the paper size (1369 tokens x 1024 channels x 4 layers,
#      r = 1, 3, 5) for N = 200, 1000, 2000: float32 (official) and float16 neighbour search;
#      the longest ones with --sample-sets (one (layer, r) set measured, time x 12).
#
# Prepare (on a machine with pip access, in the repo root; the GPU machine has PyTorch, timm,
# safetensors, scipy... but not open_clip):
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#       --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 \
#       -d .whl open_clip_torch==3.3.0 ftfy wcwidth
# Run (device tool): command "bash benchmarks/gpu_checks.sh", carry [".whl"].
# Results: $OUT/gpu_checks.log (everything) plus one .jsonl per benchmark.
# Plumbing check here, in seconds:
#   SMOKE=1 DEVICE=cpu PYTHON=.venv/bin/python OUT=/tmp/gc bash benchmarks/gpu_checks.sh
set -u
PY=${PYTHON:-python3}
OUT=${OUT:-gpu_checks_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if [ -d .whl ]; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH="/tmp/site:$PWD/src"
else
    export PYTHONPATH="$PWD/src"
fi
LOG="$OUT/gpu_checks.log"
step() {  # step SECONDS NAME COMMAND...: run with a timeout, keep JSON rows in $OUT/NAME.jsonl
    local limit=$1 name=$2
    shift 2
    echo "=== $name ($(date -u +%H:%M:%S), limit ${limit}s): $*" | tee -a "$LOG"
    timeout "$limit" "$@" 2>&1 | tee -a "$LOG" | grep '^{' >>"$OUT/$name.jsonl"
    echo "=== $name exit ${PIPESTATUS[0]}" | tee -a "$LOG"
}
{
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
    "$PY" -c "import torch, open_clip; print('torch', torch.__version__, 'open_clip', open_clip.__version__, 'cuda', torch.cuda.is_available())"
} 2>&1 | tee -a "$LOG"

DEVICE=${DEVICE:-cuda}
if [ "${SMOKE:-0}" = 1 ]; then  # plumbing check on any machine: tiny sizes, seconds
    CLIP="--backbone anomalens-tiny-clip@64 --n-images 8 --batch-sizes 1 8"
    MUSC="--size 56 --feature-dim 32"
    N1="20" N2="20 40" N3="40 60"
else
    CLIP="--backbone adaptclip-vitl14-336@518 --random-weights --n-images 64 --batch-sizes 1 8 32"
    MUSC=""
    N1="200" N2="200 1000" N3="1000 2000"
fi
# shellcheck disable=SC2086  # word splitting of the option strings is intended
step 200 adaptclip_speed "$PY" benchmarks/adaptclip_speed.py --device "$DEVICE" $CLIP \
    --precisions fp32 bf16 --shots 0 1 --threads 8
# shellcheck disable=SC2086
step 150 musc_scale_fp32 "$PY" benchmarks/musc_scale.py --device "$DEVICE" --n $N1 $MUSC
# shellcheck disable=SC2086
step 150 musc_scale_fp16 "$PY" benchmarks/musc_scale.py --device "$DEVICE" --n $N2 $MUSC \
    --msm-dtype float16
# shellcheck disable=SC2086
step 150 musc_scale_sampled "$PY" benchmarks/musc_scale.py --device "$DEVICE" --n $N3 $MUSC \
    --msm-dtype float16 --feature-dtype float16 --sample-sets
echo "done $(date -u +%H:%M:%S)" | tee -a "$LOG"
