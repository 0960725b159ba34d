"""Training: a trainer on ``accelerate`` with exact resume, checkpoints and safety stops.

Causal-LM supervised fine-tuning of a LoRA delta, end to end::

    import deltatune as dt
    from deltatune import models
    from deltatune.tasks import CausalLMSFT
    from deltatune.train import TrainConfig, train

    model, tok = models.load("smollm2-135m-instruct")
    task = CausalLMSFT(tok, max_length=128, max_new_tokens=32, generate_examples=50)
    dm = dt.attach(model, dt.LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]))
    rows = [{"prompt": "Define the word cat (noun).", "response": "feline mammal"}, ...]
    before = task.evaluate(dm, task.encode_rows(held_out))   # loss, perplexity, rouge_l
    result = train(dm, task, rows, eval_data=held_out,
                   config=TrainConfig(output_dir="runs/demo", epochs=1, batch_size=8,
                                      lr=2e-4, warmup_ratio=0.05, schedule="cosine",
                                      eval_every=50, save_every=50))
    result.history          # [{"step", "loss", "lr", "grad_norm", "items"}, ...] per step
    result.final_eval       # {"loss", "perplexity", "tokens", "rouge_l"} on eval_data
    result.delta_dir        # runs/demo/adapter: the trained delta (load with dt.load)
    task.generate(dm, task.encode_rows(held_out[:5]))   # greedy generations (strings)

``train(..., resume="auto")`` continues from the newest complete checkpoint in
``output_dir`` and ends with the same weights, bit for bit on CPU, as a run that was
never interrupted. ``Trainer`` is the class behind ``train`` (``fit``, ``evaluate``,
``save_checkpoint``, ``load_checkpoint``, ``request_stop``). Files written into
``output_dir``: ``checkpoints/step-XXXXXXXX/`` (see :mod:`deltatune.train.checkpoint`),
``adapter/`` (final), ``best/`` (best evaluation, when evaluating), ``log.jsonl`` (one
JSON line per optimizer step and per evaluation) and, from the CLI, ``run.yaml``.
docs/training.md describes every setting, the checkpoint format and the safety rules.
"""

from deltatune.train.checkpoint import ResumeError, find_resumable, list_checkpoints
from deltatune.train.config import TrainConfig
from deltatune.train.trainer import (
    Trainer,
    TrainerCallback,
    TrainingInterrupted,
    TrainingOutOfMemory,
    TrainResult,
    lr_factor,
    train,
)

__all__ = [
    "ResumeError",
    "TrainConfig",
    "TrainResult",
    "Trainer",
    "TrainerCallback",
    "TrainingInterrupted",
    "TrainingOutOfMemory",
    "find_resumable",
    "list_checkpoints",
    "lr_factor",
    "train",
]
