#!/usr/bin/env bash
# One `device` call that re-checks the GPU paths after a change, in the order that matters:
# the CUDA tests first, then the bench's correctness rows with decode, one layer and
# prefill timings (1B shape), then the TMA probe at rank 32. Logs and JSON land in $OUT
# (the device tool brings that folder back) and in bench/results/.
#
#   bash bench/gpu_checks.sh            # meant to fit one device call (10 minutes)
set -u
export PYTHONPATH=src
out=${OUT:-bench/results}
mkdir -p "$out"
python -m pytest -q -p no:cacheprovider tests/kernels > "$out/pytest-kernels.log" 2>&1
tail -3 "$out/pytest-kernels.log"
python bench/gpu_lora.py --check --layer --graph-decode --infer --frameworks deltatune \
    --shapes 1b --reps 5 > "$out/gpu_lora-checks.log" 2>&1
grep -E "FAIL|ratios|graph 1b (decode|one decode step)|layer|prefill unmerged" \
    "$out/gpu_lora-checks.log" | tail -20
# the TMA GEMM's tiles for ranks above 16 (untimed so far; off by default until they are)
TMA_PROBE_RANK=32 python bench/tma_probe.py 2>&1 | tail -9
