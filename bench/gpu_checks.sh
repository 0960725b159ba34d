#!/usr/bin/env bash
# Re-check the GPU paths after a change, in two `device` calls of under 10 minutes each
# (together they ran ~9.5 minutes on an H200 in December 2026, too close to one call's
# limit; a run cut off there loses its JSON):
#
#   bash bench/gpu_checks.sh 1   # CUDA tests, then correctness rows and decode (1B shape)
#   bash bench/gpu_checks.sh 2   # one layer, prefill, and the layer's kernel profile
#   bash bench/gpu_checks.sh 3   # training against PEFT + Liger (carry bench/wheels)
#
# Logs and JSON land in $OUT (the device tool brings that folder back) and bench/results/.
set -u
export PYTHONPATH=src
out=${OUT:-bench/results}
part=${1:-1}
mkdir -p "$out"
if [ "$part" = 1 ]; then
    python -m pytest -q -p no:cacheprovider tests/kernels > "$out/pytest-kernels.log" 2>&1
    tail -3 "$out/pytest-kernels.log"
    python bench/gpu_lora.py --check --graph-decode --frameworks deltatune --shapes 1b \
        --reps 5 > "$out/gpu_lora-decode.log" 2>&1
    grep -E "FAIL|graph 1b (decode|one decode step)" "$out/gpu_lora-decode.log" | tail -8
elif [ "$part" = 2 ]; then
    python bench/gpu_lora.py --layer --infer --frameworks deltatune --shapes 1b --reps 5 \
        > "$out/gpu_lora-layer.log" 2>&1
    grep -E "FAIL|layer |prefill unmerged" "$out/gpu_lora-layer.log" | tail -10
    # where the layer's and the prompt's time goes (kernel tables, host time, timeline)
    python bench/profile_gaps.py layer 2>&1 | grep -E "layer |profile layer|host" | tail -12
elif [ "$part" = 3 ]; then
    # training against PEFT + Liger: needs the wheel carried in bench/wheels (made here by
    # `pip download --no-deps -d bench/wheels liger-kernel==0.8.5`)
    python -m pip install --no-deps -q bench/wheels/liger_kernel-*.whl || exit 1
    python -c "import liger_kernel.transformers" || exit 1
    python bench/gpu_lora.py --train --shapes 1b --ckpt 0,1 --steps 5 --frameworks deltatune \
        --variants "peft bf16 + Liger,deltatune fast + Liger,deltatune fast,deltatune fast compiled" \
        > "$out/gpu_lora-liger.log" 2>&1
    grep -E "^train 1b" "$out/gpu_lora-liger.log" | tail -10
else
    echo "usage: bash bench/gpu_checks.sh 1|2|3" >&2
    exit 2
fi
