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


def build_model(shape: str, dtype: torch.dtype) -> Any:
    """A randomly initialised Llama of ``shape`` with LoRA r=16 on all linear layers."""
    from transformers import LlamaConfig, LlamaForCausalLM

    import deltatune as dt

    torch.manual_seed(0)
    config = LlamaConfig(**SHAPES[shape], max_position_embeddings=8192,
                         attn_implementation="sdpa")
    # built directly on this process's GPU (a CPU init of an 8B model takes minutes; FSDP1
    # refuses a module on another rank's device)
    device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}" if torch.cuda.is_available() \
        else "cpu"
    if torch.cuda.is_available():
        torch.cuda.set_device(device)
    with torch.device(device):
        model = LlamaForCausalLM(config).to(dtype)
    return dt.attach(model, dt.LoraConfig(r=16, lora_alpha=32, target_modules=TARGETS))


def run(args: argparse.Namespace) -> None:
    """Train, time and save under the launcher's process group; rank 0 writes the results."""
    from deltatune.core import io
    from deltatune.train import TrainConfig, Trainer, TrainerCallback

    cuda = torch.cuda.is_available()
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype or
                                                             ("bf16" if cuda else "fp32")]
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if args.global_batch % world:
        raise SystemExit(f"--global-batch {args.global_batch} is not divisible by {world} "
                         f"processes")
    per_gpu = args.global_batch // world
    if cuda and dtype == torch.float32:
        # the correctness runs: true float32 products, not TF32
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    micro = min(args.micro_batch or per_gpu, per_gpu)
    if per_gpu % micro:
        raise SystemExit(f"--micro-batch {micro} does not divide the per-GPU batch {per_gpu}")
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
        batch_size=micro, grad_accum=per_gpu // micro, lr=1e-4, schedule="constant", progress=False,
        gradient_checkpointing=args.checkpointing, handle_signals=False,
        mixed_precision="no", max_grad_norm=args.max_grad_norm), callbacks=[Clock()])
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    trainer.fit()
    acc = trainer.accelerator
    timed = times[args.warmup:] or times
    step_s = sum(timed) / len(timed)
    peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else float("nan")
    peaks = acc.gather(torch.tensor([peak], device=acc.device)).tolist()
    fsdp = acc.distributed_type == "FSDP"
    fsdp_version = acc.state.fsdp_plugin.fsdp_version if fsdp else None
    if args.strategy.startswith("fsdp") and not fsdp:
        raise SystemExit("--strategy fsdp needs the FSDP launch flags (see bench/multi_gpu.sh)")
    if acc.is_main_process:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        tag = f"{args.strategy}-{world}gpu"
        # what the trainer saved (it gathers FSDP shards first): the file a user gets
        delta, _ = io.load_tensors(Path(trainer.config.output_dir) / "adapter" /
                                   "delta.safetensors")
        io.save_tensors(out / f"{tag}.delta.safetensors",
                        {k: v.detach().float().cpu().contiguous() for k, v in delta.items()})
        tokens = args.global_batch * args.seq
        result = {
            "strategy": args.strategy, "gpus": world, "shape": args.shape, "seq": args.seq,
            "global_batch": args.global_batch, "per_gpu_batch": per_gpu,
            "gradient_checkpointing": args.checkpointing, "step_s": step_s,
            "dtype": str(dtype).removeprefix("torch."), "micro_batch": micro,
            "fsdp_version": fsdp_version,
            "losses": [r.get("loss") for r in trainer.history],
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


def delta_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]
                     ) -> tuple[float, float]:
    """Return (worst max-abs relative, worst Frobenius relative) difference over the tensors."""
    worst_max = max(float((a[k] - b[k]).abs().max() / (a[k].abs().max() + 1e-12)) for k in a)
    worst_fro = max(float(torch.linalg.vector_norm(a[k] - b[k]) /
                          (torch.linalg.vector_norm(a[k]) + 1e-12)) for k in a)
    return worst_max, worst_fro


def compare(args: argparse.Namespace) -> int:
    """Check two runs agree and print the scaling table of ``--out``; 0 if they agree.

    float32 runs are the correctness gate: the deltas must agree to 5e-3 (max-abs
    relative; reduction order differs between GPU counts and AdamW's first steps turn
    tiny gradient differences into sign-sized updates of the zero-initialised B). bf16
    deltas cannot be held to that (bf16 noise in near-zero gradients flips those signs
    too), so bf16 runs are held to their per-step losses (1e-2 relative) and the delta
    differences are reported alongside.
    """
    from deltatune.core import io

    a, _ = io.load_tensors(Path(args.compare[0]))
    b, _ = io.load_tensors(Path(args.compare[1]))
    if a.keys() != b.keys():
        print(f"deltas DIFFER: key sets differ ({len(a)} vs {len(b)} tensors)")
        return 1
    worst_max, worst_fro = delta_difference(a, b)
    runs = [json.loads(Path(str(p).replace(".delta.safetensors", ".json")).read_text())
            for p in args.compare]
    loss_a, loss_b = runs[0].get("losses") or [], runs[1].get("losses") or []
    loss_rel = max((abs(x - y) / abs(x) for x, y in zip(loss_a, loss_b)), default=float("nan"))
    fp32 = all(r.get("dtype", "bfloat16") == "float32" for r in runs)
    ok = worst_max < 5e-3 if fp32 else loss_rel < 1e-2
    verdict = "agree" if ok else "DIFFER"
    rule = "float32: max-abs relative < 5e-3" if fp32 else "bf16: losses within 1e-2"
    print(f"deltas {verdict} ({rule}): "
          f"worst relative difference {worst_max:.2e} (max-abs), {worst_fro:.2e} (Frobenius); "
          f"per-step loss {loss_rel:.2e}")
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
    p.add_argument("--strategy", choices=["ddp", "fsdp", "fsdp2"], default="ddp",
                   help="a label for the results; FSDP itself comes from the launch flags")
    p.add_argument("--dtype", choices=["bf16", "fp32"], default=None,
                   help="weights and compute dtype (default: bf16 on CUDA, fp32 on CPU); "
                        "fp32 is the correctness check")
    p.add_argument("--micro-batch", type=int, default=None,
                   help="rows per forward/backward on one GPU (gradient accumulation makes up "
                        "the per-GPU batch; default: all of it at once)")
    p.add_argument("--global-batch", type=int, default=16)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--steps", type=int, default=10, help="timed steps")
    p.add_argument("--warmup", type=int, default=3, help="untimed first steps")
    p.add_argument("--max-grad-norm", type=float, default=1.0,
                   help="gradient clipping threshold (small values make clipping active)")
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
