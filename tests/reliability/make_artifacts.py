"""Write this release's regression artifacts (RELIABILITY.md row 23).

    PYTHONPATH=src python tests/reliability/make_artifacts.py

Everything is safetensors + JSON; nothing is pickled. Cases of ``artifacts/<version>/``:

- ``<toy case>/``: a delta saved on the seeded Toy model (tests/reliability/_toy.py, pure
  torch, built in code, so no base weights are stored) and ``expected/expected.safetensors``
  with the input ids and the adapted model's outputs;
- ``base-tiny-llama/``: one tiny random Llama (``save_pretrained``, 27k weights) that the
  cases below run on, stored so that a change of transformers' weight init cannot move
  the reference outputs;
- ``method-<name>/``: a delta of every registered method on that Llama, random tensors,
  with the logits it gives;
- ``peft-<type>/``: an adapter written by Hugging Face PEFT itself (``save_pretrained``)
  for every PEFT type deltatune imports, with the logits PEFT computed (real positions);
- ``trainer-checkpoint/``: a training checkpoint taken mid gradient-accumulation, the
  data, tokenizer and settings of its run, and the final delta tensors and loss/LR
  history of the uninterrupted run, which resuming the checkpoint must reproduce.

Each case directory holds ``case.json`` (its kind and base; Toy cases predate it). A case
once written is never rewritten: this script only adds the cases missing from the
current version's directory, and each release adds its own directory.
``test_row23_regression.py`` loads every case of every version on every CI run.
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import deltatune as dt
from deltatune.core import io
from deltatune.core.config import LIBRARY_VERSION
from tests.conftest import randomize_deltas, tiny_llama, token_batch
from tests.reliability._methods import example_config, methods
from tests.reliability._toy import fill, toy, toy_ids

ROOT = Path(__file__).with_name("artifacts")
BASE = "base-tiny-llama"
P = 3  # virtual tokens of the PEFT prompt cases

TOY_CASES = {
    "lora": lambda: dt.LoraConfig(r=2, lora_alpha=4.0, target_modules=["emb", "proj", "conv",
                                                                          "out"]),
    "lora_rslora_pattern": lambda: dt.LoraConfig(r=4, lora_alpha=8.0, use_rslora=True,
                                                 target_modules=["proj", "conv", "out"],
                                                 rank_pattern={"out": 2}),
    "loha": lambda: dt.get_method("loha").config_cls(r=2, target_modules=["proj", "conv"]),
}


def _peft_cases() -> dict[str, Any]:
    import peft

    lm = "CAUSAL_LM"
    return {
        "lora": peft.LoraConfig(task_type=lm, r=2, lora_alpha=4, lora_dropout=0.0,
                                target_modules=["q_proj", "v_proj", "down_proj"]),
        "adalora": peft.AdaLoraConfig(task_type=lm, init_r=4, target_r=2, total_step=10,
                                      target_modules=["q_proj", "v_proj"]),
        "ia3": peft.IA3Config(task_type=lm, target_modules=["k_proj", "v_proj", "down_proj"],
                              feedforward_modules=["down_proj"]),
        "loha": peft.LoHaConfig(task_type=lm, r=2, alpha=4, target_modules=["q_proj", "v_proj"]),
        "prompt_tuning": peft.PromptTuningConfig(task_type=lm, num_virtual_tokens=P),
        "prefix_tuning": peft.PrefixTuningConfig(task_type=lm, num_virtual_tokens=P),
        "p_tuning": peft.PromptEncoderConfig(task_type=lm, num_virtual_tokens=P,
                                             encoder_hidden_size=16),
    }


# Trainer checkpoint case: the run's settings (stored with the case).
TRAIN_ROWS = [{"prompt": f"q{i} {w}", "response": f"{w} {w[::-1]}"}
              for i, w in enumerate(["cat", "dog", "emu", "yak", "owl", "bee", "ant"])]
TRAIN_DELTA = {"method": "lora", "r": 2, "lora_alpha": 4, "lora_dropout": 0.1,
               "target_modules": ["q_proj", "v_proj"]}
TRAIN_SETTINGS = dict(epochs=2, batch_size=2, grad_accum=2, lr=5e-3, schedule="cosine",
                      warmup_steps=1, seed=3, progress=False, save_every=None,
                      keep_checkpoints=5)
TRAIN_TASK = {"max_length": 40}
STOP_AT = (2, 1)  # optimizer step 3, after its first micro-batch


def llama_inputs() -> dict[str, torch.Tensor]:
    """The input of every Llama case: 2 rows of 5 seeded token ids."""
    ids = token_batch(batch=2, length=5, seed=7)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def load_base(version_dir: Path, name: str = BASE) -> torch.nn.Module:
    """Load a stored base model (safetensors) in eval mode."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(version_dir / name).eval()


def _write_case(directory: Path, case: dict[str, Any], write) -> None:
    """Write a case into ``directory`` atomically: ``write(tmp)`` fills it, case.json last."""
    with io.atomic_directory(directory) as tmp:
        write(tmp)
        io.write_json(tmp / "case.json", case)
    print(f"wrote {directory}")


def _save_expected(directory: Path, tensors: dict[str, torch.Tensor]) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    io.save_tensors(directory / "expected.safetensors",
                    {k: v.detach().contiguous() for k, v in tensors.items()})


def toy_cases(target: Path) -> None:
    """The Toy-model deltas (the first cases; they have no case.json)."""
    for case, make in TOY_CASES.items():
        if (target / case).exists():
            continue
        dm = dt.DeltaModel(toy())
        dm.add(case, make())
        fill(dm, seed=5, std=0.2)
        ids = toy_ids(batch=2, length=6, seed=7)
        with torch.no_grad():
            out = dm(ids)
        dm.save_delta(target / case / "delta")
        with io.atomic_directory(target / case / "expected") as tmp:
            io.save_tensors(tmp / "expected.safetensors", {"input_ids": ids, "output": out})
        print(f"wrote {target / case}")


def base_model(target: Path) -> None:
    """The tiny Llama every other case runs on."""
    if (target / BASE).exists():
        return
    with io.atomic_directory(target / BASE) as tmp:
        tiny_llama().save_pretrained(tmp, safe_serialization=True)
    print(f"wrote {target / BASE}")


def method_cases(target: Path) -> None:
    """One delta per registered method on the stored Llama, with its logits."""
    inputs = llama_inputs()
    for method in methods():
        directory = target / f"method-{method}"
        if directory.exists():
            continue
        dm = dt.DeltaModel(load_base(target))
        dm.add(method, example_config(method))
        randomize_deltas(dm, std=0.2, seed=11)
        with torch.no_grad():
            out = dm(**inputs).logits

        def write(tmp: Path, dm=dm, out=out) -> None:
            dm.save_delta(tmp / "delta")
            _save_expected(tmp / "expected", {**inputs, "output": out})

        _write_case(directory, {"kind": "delta", "base": BASE, "method": method}, write)


def peft_cases(target: Path) -> None:
    """One PEFT-written adapter per PEFT type we import, with PEFT's own logits."""
    import peft

    inputs = llama_inputs()
    n = inputs["input_ids"].shape[1]
    for peft_type, config in _peft_cases().items():
        directory = target / f"peft-{peft_type}"
        if directory.exists():
            continue
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            pm = peft.get_peft_model(load_base(target), config)
        gen = torch.Generator().manual_seed(13)
        with torch.no_grad():
            for p in pm.parameters():
                if p.requires_grad:
                    p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
        pm.eval()
        with torch.no_grad():
            logits = pm(**inputs).logits
        expected = {**inputs, "output": logits[:, logits.shape[1] - n:]}
        if peft_type == "prefix_tuning":
            # PEFT's prefix cache moves the real tokens to positions P.. P + n - 1.
            expected["position_ids"] = torch.arange(P, P + n).expand(2, -1).contiguous()

        def write(tmp: Path, pm=pm, expected=expected) -> None:
            pm.save_pretrained(tmp / "peft", safe_serialization=True)
            _save_expected(tmp / "expected", expected)

        _write_case(directory, {"kind": "peft", "base": BASE, "peft_type": peft_type,
                                "peft_version": peft.__version__}, write)


def train_setup(version_dir: Path, case_dir: Path, output_dir: Path):
    """Return (delta model, task, rows, TrainConfig) of the stored trainer case."""
    from transformers import PreTrainedTokenizerFast

    from deltatune.core.registry import config_from_dict
    from deltatune.tasks import CausalLMSFT
    from deltatune.train import TrainConfig

    run = json.loads((case_dir / "run.json").read_text())
    dm = dt.DeltaModel(load_base(version_dir, run["base"]))
    dm.add("default", config_from_dict(run["delta"]))
    tokenizer = PreTrainedTokenizerFast.from_pretrained(case_dir / "tokenizer")
    task = CausalLMSFT(tokenizer, max_length=run["task"]["max_length"], generate_examples=0)
    config = TrainConfig.from_dict({**run["train"], "output_dir": str(output_dir)})
    return dm, task, run["rows"], config


def trainer_case(target: Path) -> None:
    """A mid-accumulation checkpoint and what resuming it must reproduce."""
    from deltatune.train import Trainer, TrainerCallback, list_checkpoints
    from tests.tiny_tokenizer import char_tokenizer

    directory = target / "trainer-checkpoint"
    if directory.exists():
        return

    class StopAt(TrainerCallback):
        def on_micro_step(self, trainer) -> None:
            if (trainer.step, trainer.micro) == STOP_AT:
                trainer.request_stop()

    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        spec = scratch / "spec"
        spec.mkdir()
        char_tokenizer().save_pretrained(spec / "tokenizer")
        io.write_json(spec / "run.json", {"base": BASE, "delta": TRAIN_DELTA,
                                          "train": TRAIN_SETTINGS, "task": TRAIN_TASK,
                                          "rows": TRAIN_ROWS})
        torch.manual_seed(0)
        dm, task, rows, cfg = train_setup(target, spec, scratch / "straight")
        trainer = Trainer(dm, task, rows, None, cfg)
        result = trainer.fit()
        final = {k: v.detach().clone() for k, v in trainer.model.delta_state_dict().items()}
        torch.manual_seed(0)  # the same initial delta as the straight run
        dm, task, rows, cfg = train_setup(target, spec, scratch / "stopped")
        stopped = Trainer(dm, task, rows, None, cfg, callbacks=[StopAt()]).fit()
        assert stopped.stop_reason == "stopped", stopped.stop_reason
        (checkpoint,) = list_checkpoints(scratch / "stopped")

        def write(tmp: Path) -> None:
            shutil.copytree(spec / "tokenizer", tmp / "tokenizer")
            shutil.copy2(spec / "run.json", tmp / "run.json")
            shutil.copytree(checkpoint, tmp / "checkpoint")
            _save_expected(tmp / "expected", final)
            io.write_json(tmp / "expected" / "history.json", result.history)

        _write_case(directory, {"kind": "checkpoint", "base": BASE,
                                "checkpoint": checkpoint.name, "steps": result.steps}, write)


def main() -> None:
    """Add the missing cases of this release's artifacts/<version>/ (never rewriting one)."""
    target = ROOT / LIBRARY_VERSION
    target.mkdir(parents=True, exist_ok=True)
    toy_cases(target)
    base_model(target)
    method_cases(target)
    peft_cases(target)
    trainer_case(target)


if __name__ == "__main__":
    main()
