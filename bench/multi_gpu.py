"""LoRA training of a Llama shape under DDP or FSDP on 1-8 GPUs, through deltatune's trainer.

Launched once per GPU count by ``bench/multi_gpu.sh`` (``accelerate launch`` with the
DDP or FSDP configuration), or by hand::

    accelerate launch --num_processes 2 --multi_gpu bench/multi_gpu.py --shape 8b \\
        --strategy ddp --global-batch 16 --out bench/results/multi_gpu

    accelerate launch --num_processes 4 --use_fsdp --fsdp_sharding_strategy FULL_SHARD \\
        --fsdp_use_orig_params true --fsdp_auto_wrap_policy TRANSFORMER_BASED_WRAP \\
        --fsdp_transformer_layer_cls_to_wrap LlamaDecoderLayer \\
        bench/multi_gpu.py --shape 8b --strategy fsdp --global-batch 16 --out ...

Each run trains LoRA r=16 on every linear layer of a randomly initialised Llama shape
(bf16 base; FSDP shards the frozen base weights and keeps the LoRA tensors trainable
with ``use_orig_params``), for the same *global* batch whatever the GPU count, and
writes ``<out>/<strategy>-<N>gpu.json`` (tokens/s in all and per GPU, peak memory per
GPU, step time) and ``<out>/<strategy>-<N>gpu.delta.safetensors``. ``--compare A B``
checks that two saved deltas agree within bf16 tolerance and prints the scaling table
of every JSON in ``--out``.

On CPU (no CUDA) it runs the ``tiny`` shape under gloo, which is what the test suite and a
machine without GPUs can check: ``torchrun --nproc_per_node 2 bench/multi_gpu.py --shape
tiny --strategy ddp --steps 3 --global-batch 4 --seq 32 --out /tmp/mg``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

SHAPES: dict[str, dict[str, Any]] = {
    "8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
               num_attention_heads=32, num_key_value_heads=8, vocab_size=128256),
    "1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
               num_attention_heads=32, num_key_value_heads=8, vocab_size=128256),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, vocab_size=512),
}
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def synthetic_task() -> Any:
    """A language-modelling task over pre-tokenised random rows (no tokenizer needed)."""
    import torch.nn.functional as F

    from deltatune.tasks.base import Task

    class RandomTokens(Task):
        name = "random-tokens"

        def encode(self, row: dict[str, Any]) -> dict[str, Any]:
            return {"input_ids": row["input_ids"]}

        def count_items(self, example: dict[str, Any]) -> int:
            return len(example["input_ids"]) - 1

        def collate(self, examples: Any) -> dict[str, torch.Tensor]:
            return {"input_ids": torch.tensor([e["input_ids"] for e in examples])}

        def loss_sum(self, model: Any, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
            ids = batch["input_ids"]
            logits = model(input_ids=ids).logits[:, :-1].float()
            target = ids[:, 1:].to(logits.device)
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1),
                                   reduction="sum")
            return loss, target.numel()

        def evaluate(self, model: Any, examples: Any, *, batch_size: int = 8,
                     progress: bool = False) -> dict[str, float]:
            return {"loss": float("nan")}

    return RandomTokens()


def match_delta_keys(state: dict[str, torch.Tensor], names: list[str]
                     ) -> dict[str, torch.Tensor]:
    """Pick the delta tensors ``names`` out of a gathered full (FSDP) state dict.

    The gathered keys carry wrapper segments and the delta's slot (``deltas.<name>.``),
    which the delta's own keys do not; a key matches when its cleaned form ends with it.
    """
    import re

    cleaned = {re.sub(r"(_fsdp_wrapped_module|_checkpoint_wrapped_module|_orig_mod)\.", "",
                      re.sub(r"deltas\.[^.]+\.", "", k)): v for k, v in state.items()}
    out = {}
    for name in names:
        hits = [k for k in cleaned if k == name or k.endswith("." + name)]
        if len(hits) != 1:
            raise KeyError(f"{name}: {len(hits)} matching keys in the gathered state dict")
        out[name] = cleaned[hits[0]]
    return out


def build_model(shape: str, dtype: torch.dtype) -> Any:
    """A randomly initialised Llama of ``shape`` with LoRA r=16 on all linear layers."""
    from transformers import LlamaConfig, LlamaForCausalLM

    import deltatune as dt

    torch.manual_seed(0)
    config = LlamaConfig(**SHAPES[shape], max_position_embeddings=8192,
                         attn_implementation="sdpa")
    # built directly on the GPU: a CPU init of an 8B model takes minutes
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = LlamaForCausalLM(config).to(dtype)
    return dt.attach(model, dt.LoraConfig(r=16, lora_alpha=32, target_modules=TARGETS))


def run(args: argparse.Namespace) -> None:
    """Train, time and save under the launcher's process group; rank 0 writes the results."""
    from deltatune.core import io
    from deltatune.train import TrainConfig, Trainer, TrainerCallback

    cuda = torch.cuda.is_available()
    dtype = torch.bfloat16 if cuda else torch.float32
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if args.global_batch % world:
        raise SystemExit(f"--global-batch {args.global_batch} is not divisible by {world} "
                         f"processes")
    per_gpu = args.global_batch // world
    dm = build_model(args.shape, dtype)
    vocab = SHAPES[args.shape]["vocab_size"]
    gen = torch.Generator().manual_seed(1)
    steps = args.warmup + args.steps
    rows = [{"input_ids": torch.randint(0, vocab, (args.seq,), generator=gen).tolist()}
            for _ in range(steps * args.global_batch)]
    times: list[float] = []

    class Clock(TrainerCallback):
        # the trainer's step callbacks give per-step wall time without touching its loop
        last = time.perf_counter()

        def on_step_end(self, trainer: Any, record: dict[str, Any]) -> None:
            if cuda:
                torch.cuda.synchronize()
            now = time.perf_counter()
            times.append(now - Clock.last)
            Clock.last = now

    trainer = Trainer(dm, synthetic_task(), rows, None, TrainConfig(
        output_dir=str(Path(args.out) / f"run-{args.strategy}-{world}"), max_steps=steps,
        batch_size=per_gpu, lr=1e-4, schedule="constant", progress=False,
        gradient_checkpointing=args.checkpointing, handle_signals=False,
        mixed_precision="no"), callbacks=[Clock()])
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    trainer.fit()
    acc = trainer.accelerator
    timed = times[args.warmup:] or times
    step_s = sum(timed) / len(timed)
    peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else float("nan")
    peaks = acc.gather(torch.tensor([peak], device=acc.device)).tolist()
    state = acc.get_state_dict(acc.unwrap_model(trainer.model)) if args.strategy == "fsdp" \
        else None
    if acc.is_main_process:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        tag = f"{args.strategy}-{world}gpu"
        delta = dm.delta_state_dict()
        if state is not None:
            delta = match_delta_keys(state, list(delta))
        io.save_tensors(out / f"{tag}.delta.safetensors",
                        {k: v.detach().float().cpu().contiguous() for k, v in delta.items()})
        tokens = args.global_batch * args.seq
        result = {
            "strategy": args.strategy, "gpus": world, "shape": args.shape, "seq": args.seq,
            "global_batch": args.global_batch, "per_gpu_batch": per_gpu,
            "gradient_checkpointing": args.checkpointing, "step_s": step_s,
            "tokens_per_s": tokens / step_s, "tokens_per_s_per_gpu": tokens / step_s / world,
            "peak_memory_gib_per_gpu": peaks, "steps_timed": len(timed),
            "machine": {"gpu": torch.cuda.get_device_name() if cuda else "cpu",
                        "host": platform.node()},
            "versions": {"torch": torch.__version__, "python": platform.python_version()},
            "command": " ".join(sys.argv),
        }
        (out / f"{tag}.json").write_text(json.dumps(result, indent=2))
        print(json.dumps(result))
    acc.wait_for_everyone()


def compare(args: argparse.Namespace) -> int:
    """Check two saved deltas agree (bf16 tolerance) and print the scaling table; 0 if ok."""
    from deltatune.core import io

    a, _ = io.load_tensors(Path(args.compare[0]))
    b, _ = io.load_tensors(Path(args.compare[1]))
    worst = max(float((a[k] - b[k]).abs().max() / (a[k].abs().max() + 1e-12)) for k in a)
    ok = a.keys() == b.keys() and worst < 2e-2
    print(f"deltas {'agree' if ok else 'DIFFER'}: worst relative difference {worst:.2e}")
    rows = [json.loads(p.read_text()) for p in sorted(Path(args.out).glob("*gpu.json"))]
    base = {r["strategy"]: r["tokens_per_s_per_gpu"] for r in rows if r["gpus"] == 1}
    print(f"{'strategy':9}{'gpus':>5}{'tok/s':>12}{'tok/s/gpu':>12}{'scaling':>9}{'peak GiB':>10}")
    for r in sorted(rows, key=lambda r: (r["strategy"], r["gpus"])):
        eff = r["tokens_per_s_per_gpu"] / base[r["strategy"]] if r["strategy"] in base else 0
        print(f"{r['strategy']:9}{r['gpus']:>5}{r['tokens_per_s']:>12.0f}"
              f"{r['tokens_per_s_per_gpu']:>12.0f}{eff:>9.2f}"
              f"{max(r['peak_memory_gib_per_gpu']):>10.1f}")
    return 0 if ok else 1


def main() -> int:
    """Parse flags; train (default) or compare; return the exit code."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shape", choices=sorted(SHAPES), default="8b")
    p.add_argument("--strategy", choices=["ddp", "fsdp"], default="ddp")
    p.add_argument("--global-batch", type=int, default=16)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--steps", type=int, default=10, help="timed steps")
    p.add_argument("--warmup", type=int, default=3, help="untimed first steps")
    p.add_argument("--checkpointing", action="store_true", help="gradient checkpointing")
    p.add_argument("--out", default="bench/results/multi_gpu")
    p.add_argument("--compare", nargs=2, metavar=("DELTA_A", "DELTA_B"))
    args = p.parse_args()
    if args.compare:
        return compare(args)
    run(args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
