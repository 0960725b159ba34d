"""Worker for the DDP test: ``torchrun --nproc_per_node N tests/train/ddp_worker.py OUT B``.

Trains the same tiny LoRA as tests/train/test_ddp.py with per-process batch size B and
writes the final delta tensors (rank 0) to OUT/delta.safetensors.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT / "src"), str(ROOT)]


def build():
    """The model, task and rows shared by the 1-process and N-process runs."""
    import torch

    import deltatune as dt
    from deltatune.tasks import CausalLMSFT
    from tests.conftest import tiny_llama
    from tests.tiny_tokenizer import char_tokenizer

    torch.manual_seed(0)
    dm = dt.attach(tiny_llama(), dt.LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    rows = [{"prompt": f"q{i}", "response": "ab"[: 1 + i % 2] * (1 + i % 3)} for i in range(12)]
    task = CausalLMSFT(char_tokenizer(), chat_template=False, generate_examples=0)
    return dm, task, rows


def main() -> None:
    import torch

    from deltatune.core import io
    from deltatune.train import TrainConfig, Trainer

    torch.set_num_threads(1)
    out, batch = Path(sys.argv[1]), int(sys.argv[2])
    dm, task, rows = build()
    trainer = Trainer(dm, task, rows, None, TrainConfig(
        output_dir=str(out / "run"), epochs=2, batch_size=batch, lr=1e-2, progress=False,
        max_grad_norm=1.0, handle_signals=False))
    result = trainer.fit()
    if trainer.accelerator.is_main_process:
        io.save_tensors(out / "delta.safetensors", dm.delta_state_dict())
        (out / "losses.txt").write_text("\n".join(str(h["loss"]) for h in result.history))
    trainer.accelerator.wait_for_everyone()


if __name__ == "__main__":
    main()
