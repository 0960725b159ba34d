"""SFT packing on the WordNet demo data with SmolLM2-135M: rows, padding, CPU step time.

    PYTHONPATH=src python bench/packing.py --steps 0 --batch-size 16 --max-length 256

For the training split (chat template, loss on the answer), with and without
``packing``: the number of rows, optimizer steps per epoch, the tokens the model
processes in one epoch (padded batches, in the trainer's own data order) and the share
of them that is padding; then ``--steps`` optimizer steps of LoRA (r=8, q/v) training
each way (0: skip), timed after one warm-up step, as supervised tokens per second. The
examples average ~48 tokens here, so rows of 64 hold one each: use a larger
``--max-length`` to see packing work. Also checks,
on the first packed batch, that its summed loss equals the summed loss of the same
examples unpacked. Writes bench/results/packing-<time>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import deltatune as dt
from deltatune import data, models
from deltatune.tasks import CausalLMSFT
from deltatune.train import TrainConfig, Trainer, TrainerCallback


class Timer(TrainerCallback):
    """Wall time of each optimizer step (from the end of the previous one)."""

    def __init__(self) -> None:
        self.marks: list[float] = []

    def on_step_end(self, trainer, record):
        self.marks.append(time.perf_counter())


def epoch_tokens(trainer: Trainer) -> tuple[int, int]:
    """(tokens in padded batches, real tokens) over one epoch in the trainer's order."""
    padded = real = 0
    for step in range(trainer.steps_per_epoch):
        for micro in trainer.window(step):
            batch = trainer.task.collate([trainer.train_examples[i] for i in micro])
            padded += batch["input_ids"].numel()
            real += int(batch["attention_mask"].sum())
    return padded, real


def main() -> None:
    """Run the comparison and write the JSON result."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=0, help="timed training steps (0: none)")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--max-length", type=int, default=64)
    ap.add_argument("--rows", type=int, default=4000, help="training rows used")
    args = ap.parse_args()
    torch.manual_seed(0)
    rows = data.read("wordnet-definitions-demo")[:args.rows]
    result: dict = {"data": "wordnet-definitions-demo[train]", "rows": len(rows),
                    "model": "smollm2-135m-instruct", "batch_size": args.batch_size,
                    "max_length": args.max_length, "threads": torch.get_num_threads(),
                    "machine": platform.processor() or platform.machine(), "runs": {}}
    for packing in (False, True):
        model, tok = models.load("smollm2-135m-instruct")
        task = CausalLMSFT(tok, model=model, max_length=args.max_length, generate_examples=0)
        dm = dt.attach(model, dt.LoraConfig(r=8, lora_alpha=16,
                                            target_modules=["q_proj", "v_proj"]))
        out = Path(os.environ.get("TMPDIR", "/tmp")) / f"bench-packing-{packing}"
        cfg = TrainConfig(output_dir=str(out), batch_size=args.batch_size, lr=2e-4,
                          max_steps=args.steps + 1, packing=packing, progress=False,
                          handle_signals=False)
        timer = Timer()
        trainer = Trainer(dm, task, rows, None, cfg, callbacks=[timer])
        padded, real = epoch_tokens(trainer)
        entry = {"train_rows": len(trainer.train_examples),
                 "steps_per_epoch": trainer.steps_per_epoch,
                 "epoch_tokens_processed": padded, "epoch_real_tokens": real,
                 "padding_share": round(1 - real / padded, 4)}
        if packing:
            first = trainer.window(0)[0]
            packed = [trainer.train_examples[i] for i in first]
            unpacked_ids = {tuple(e["input_ids"]): e for e in task.encode_rows(rows)}
            members = []
            for r in packed:
                start = 0
                for n in r["segments"]:
                    members.append(unpacked_ids[tuple(r["input_ids"][start:start + n])])
                    start += n
            with torch.no_grad():
                dm.eval()
                lp, npk = task.loss_sum(dm, task.collate(packed))
                lu, nun = task.loss_sum(dm, task.collate(members))
            entry["check_first_batch"] = {"examples": len(members), "items": [npk, nun],
                                          "loss_sum_packed": float(lp),
                                          "loss_sum_unpacked": float(lu)}
        entry["examples_per_row"] = round(len(rows) / len(trainer.train_examples), 2)
        if args.steps > 0:
            res = trainer.fit()
            items = [h["items"] for h in res.history[1:]]
            seconds = timer.marks[-1] - timer.marks[0]
            entry.update(timed_steps=len(items), seconds=round(seconds, 2),
                         supervised_tokens_per_s=round(sum(items) / seconds, 1),
                         seconds_per_step=round(seconds / len(items), 3))
        result["runs"]["packed" if packing else "unpacked"] = entry
        print(("packed" if packing else "unpacked"), json.dumps(entry), flush=True)
    u, p = result["runs"]["unpacked"], result["runs"]["packed"]
    result["epoch_tokens_processed_ratio"] = round(
        p["epoch_tokens_processed"] / u["epoch_tokens_processed"], 4)
    if args.steps > 0:
        result["epoch_time_ratio_estimate"] = round(
            (p["steps_per_epoch"] * p["seconds_per_step"]) /
            (u["steps_per_epoch"] * u["seconds_per_step"]), 3)
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    path = Path(__file__).resolve().parent / "results" / f"packing-{stamp}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
