#!/usr/bin/env bash
# DDP and FSDP scaling of LoRA training (8B Llama shape) on 1, 2, 4 and 8 GPUs.
#   bash bench/multi_gpu.sh [SHAPE] [GLOBAL_BATCH] [OUT]
# Runs every GPU count this host has (up to 8), then checks each N-GPU delta against the
# 1-GPU one and prints the scaling table. Results: $OUT/*.json (default
# bench/results/multi_gpu). See docs/performance.md.
set -euo pipefail
SHAPE=${1:-8b}
GLOBAL_BATCH=${2:-16}
OUT=${3:-bench/results/multi_gpu}
# NVLink SHARP / multicast stays off (the lent machines' rule; it also keeps runs comparable).
export NCCL_NVLS_ENABLE=0 NCCL_CUMEM_ENABLE=0 TOKENIZERS_PARALLELISM=false
GPUS=$(python -c "import torch; print(torch.cuda.device_count())")
if [ "$GPUS" -lt 1 ]; then
  echo "no CUDA device: run the CPU check instead:" >&2
  echo "  torchrun --nproc_per_node 2 bench/multi_gpu.py --shape tiny --strategy ddp --steps 3 --global-batch 4 --seq 32 --out /tmp/mg" >&2
  exit 2
fi
FSDP_FLAGS=(--use_fsdp --fsdp_sharding_strategy FULL_SHARD --fsdp_use_orig_params true
            --fsdp_auto_wrap_policy TRANSFORMER_BASED_WRAP
            --fsdp_transformer_layer_cls_to_wrap LlamaDecoderLayer
            --fsdp_state_dict_type FULL_STATE_DICT --fsdp_sync_module_states true)
for N in 1 2 4 8; do
  [ "$N" -le "$GPUS" ] || break
  MULTI=(); [ "$N" -gt 1 ] && MULTI=(--multi_gpu)
  accelerate launch --num_processes "$N" "${MULTI[@]}" --mixed_precision no \
    bench/multi_gpu.py --shape "$SHAPE" --strategy ddp --global-batch "$GLOBAL_BATCH" --out "$OUT"
  accelerate launch --num_processes "$N" "${FSDP_FLAGS[@]}" --mixed_precision no \
    bench/multi_gpu.py --shape "$SHAPE" --strategy fsdp --global-batch "$GLOBAL_BATCH" --out "$OUT"
done
for N in 2 4 8; do
  [ "$N" -le "$GPUS" ] || break
  for S in ddp fsdp; do
    python bench/multi_gpu.py --out "$OUT" --compare "$OUT/$S-1gpu.delta.safetensors" "$OUT/$S-${N}gpu.delta.safetensors"
  done
done
