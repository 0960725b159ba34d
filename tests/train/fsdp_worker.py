"""torchrun worker for tests/train/test_fsdp_cpu.py: LoRA under FSDP1 or FSDP2 on gloo.

Mirrors what the trainer does under ``accelerate launch --use_fsdp`` (accelerate itself
refuses FSDP without an accelerator): the optimizer is built over the original parameters
*before* wrapping, the model is wrapped per decoder layer, three AdamW steps run, and the
delta is read back through the trainer's ``full_parameters`` gather.
Usage: worker.py OUT_DIR {plain,fsdp1,fsdp2}
"""

from __future__ import annotations

import functools
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "src"))

import deltatune as dt
from deltatune.core import io
from deltatune.train.trainer import full_parameters


def main() -> None:
    out, mode = Path(sys.argv[1]), sys.argv[2]
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    distributed = "WORLD_SIZE" in os.environ
    if distributed:
        dist.init_process_group("gloo")
    rank = dist.get_rank() if distributed else 0
    world = dist.get_world_size() if distributed else 1
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64))
    dm = dt.attach(model, dt.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    opt = torch.optim.AdamW([p for p in dm.parameters() if p.requires_grad], lr=1e-2)
    wrapped: torch.nn.Module = dm
    if mode == "fsdp1":
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
        from torch.distributed.fsdp import ShardingStrategy
        from torch.distributed.fsdp.wrap import transformer_auto_wrap_policy

        policy = functools.partial(transformer_auto_wrap_policy,
                                   transformer_layer_cls={LlamaDecoderLayer})
        wrapped = FSDP(dm, use_orig_params=True, device_id=torch.device("cpu"),
                       sharding_strategy=ShardingStrategy.FULL_SHARD, auto_wrap_policy=policy)
    elif mode == "fsdp2":
        from torch.distributed.fsdp import fully_shard

        for layer in dm.model.model.layers:
            fully_shard(layer)
        fully_shard(dm)
        # FSDP2 replaces the parameters with DTensors: the optimizer must be rebuilt
        # (accelerate re-points it the same way in prepare)
        opt = torch.optim.AdamW([p for p in dm.parameters() if p.requires_grad], lr=1e-2)
    ids = torch.randint(0, 128, (3, 4, 16), generator=torch.Generator().manual_seed(1))
    for step in range(3):
        x = ids[step][rank::world]
        wrapped(input_ids=x, labels=x).loss.backward()
        opt.step()
        opt.zero_grad()
    with full_parameters(wrapped):
        delta = {k: v.detach().clone() for k, v in dm.delta_state_dict().items()}
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        io.save_tensors(out / "delta.safetensors", delta)
    if distributed:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
