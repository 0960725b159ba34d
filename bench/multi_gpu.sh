#!/usr/bin/env bash
# DDP, FSDP (FSDP1, use_orig_params) and FSDP2 scaling of LoRA training on 1-8 GPUs.
#   bash bench/multi_gpu.sh [SHAPE] [GLOBAL_BATCH] [OUT] [extra bench/multi_gpu.py flags...]
#   STRATEGIES="ddp fsdp fsdp2" (default) picks the strategies; GPU_COUNTS="1 2 4 8" (default:
#   every count this host has, up to 8) the process counts; SKIP="fsdp-1gpu ..." leaves runs out.
# Then checks each run's delta against the 1-GPU DDP one and prints the scaling table.
# Results: $OUT/*.json (default bench/results/multi_gpu). See docs/performance.md.
set -euo pipefail
SHAPE=${1:-8b}
GLOBAL_BATCH=${2:-16}
OUT=${3:-bench/results/multi_gpu}
shift $(( $# < 3 ? $# : 3 ))
EXTRA=("$@")
STRATEGIES=${STRATEGIES:-"ddp fsdp fsdp2"}
# NVLink SHARP / multicast stays off (the lent machines' rule; it also keeps runs comparable).
export NCCL_NVLS_ENABLE=0 NCCL_CUMEM_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 \
  NVSHMEM_DISABLE_NVLS=1 TOKENIZERS_PARALLELISM=false
GPUS=$(python -c "import torch; print(torch.cuda.device_count())")
if [ "$GPUS" -lt 1 ]; then
  echo "no CUDA device: run the CPU check instead (tests/train/test_fsdp_cpu.py), or:" >&2
  echo "  torchrun --nproc_per_node 2 bench/multi_gpu.py --shape tiny --strategy ddp --steps 3 --global-batch 4 --seq 32 --out /tmp/mg" >&2
  exit 2
fi
GPU_COUNTS=${GPU_COUNTS:-"1 2 4 8"}
WRAP=(--fsdp_auto_wrap_policy TRANSFORMER_BASED_WRAP
      --fsdp_transformer_layer_cls_to_wrap LlamaDecoderLayer --fsdp_state_dict_type FULL_STATE_DICT)
# FSDP1: flat parameters per decoder layer mix frozen and trainable tensors (use_orig_params),
# so it also computes the frozen weights' gradients; FSDP2 shards per parameter and does not.
FSDP1=(--use_fsdp --fsdp_version 1 --fsdp_sharding_strategy FULL_SHARD --fsdp_use_orig_params true
       --fsdp_sync_module_states true "${WRAP[@]}")
FSDP2=(--use_fsdp --fsdp_version 2 --fsdp_reshard_after_forward true "${WRAP[@]}")
RAN=()
STATUS=0
for S in $STRATEGIES; do
  for N in $GPU_COUNTS; do
    [ "$N" -le "$GPUS" ] || { echo "skipping $N GPUs: this host has $GPUS" >&2; continue; }
    case " ${SKIP:-} " in *" $S-${N}gpu "*) continue ;; esac
    case $S in
      ddp) FLAGS=(); [ "$N" -gt 1 ] && FLAGS=(--multi_gpu) ;;
      fsdp) FLAGS=("${FSDP1[@]}") ;;
      fsdp2) FLAGS=("${FSDP2[@]}") ;;
      *) echo "unknown strategy $S" >&2; exit 2 ;;
    esac
    if accelerate launch --num_processes "$N" --num_machines 1 --dynamo_backend no \
        "${FLAGS[@]}" --mixed_precision no bench/multi_gpu.py --shape "$SHAPE" --strategy "$S" \
        --global-batch "$GLOBAL_BATCH" --out "$OUT" "${EXTRA[@]}"; then
      RAN+=("$S-${N}gpu")
    else
      echo "FAILED: $S on $N GPUs" >&2; STATUS=1
    fi
  done
done
[ "${#RAN[@]}" -gt 0 ] || exit $STATUS
REF=$OUT/${RAN[0]}.delta.safetensors
for R in "${RAN[@]:1}"; do
  echo "== ${RAN[0]} vs $R"
  python bench/multi_gpu.py --out "$OUT" --compare "$REF" "$OUT/$R.delta.safetensors" || STATUS=1
done
exit $STATUS
