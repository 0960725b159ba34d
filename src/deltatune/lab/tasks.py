"""The lab's tasks: a real model, a real data set, a loss and a metric, at two sizes.

A :class:`LabTask` knows how to load a fresh model, how to cut its data set into
training batches, how to score a tuned model, and which fixed batch times inference.
Built in (all offline, see docs/lab.md):

- ``sentiment``: Rotten Tomatoes critic snippets (positive/negative) with the MiniLM-L6
  encoder and a new classification head; metric: accuracy on held-out movies.
- ``definitions``: WordNet word -> definition with SmolLM2-135M-Instruct (causal LM,
  loss on the answer tokens only); metric: ROUGE-L F1 of greedy definitions of held-out
  words (and answer-token loss). Supports in-context learning (ICL) as a no-training row.

- ``term-spans``: sequence labelling (BIO) on WordNet example sentences with MiniLM-L6
  and a new per-token head: given a query word and a sentence, tag the word's verbatim
  occurrences typed by part of speech (``B-NOUN``, ``I-VERB``...). No NER data ships in
  the registries we can reach (../shared/ASSETS.md); these labels are exact by
  construction (string matching of a synset's words in its own examples), and held-out
  words are the test set. Metric: span F1 (exact spans, CoNLL convention).
- ``sentiment-lm``: the Rotten Tomatoes snippets scored by SmolLM2-135M-Instruct through
  a hand-written template and verbaliser (" positive" / " negative" after
  "Sentiment:"); the ``manual`` row is that prompt untrained (the P-tuning paper's
  baseline), ``ptuning`` adds trained pseudo tokens in front of it.

Tests register tiny tasks on random models with :func:`register_task`.
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Callable, Sequence
from typing import Any, ClassVar

import torch

from deltatune.core.errors import ConfigError, DataError

Batch = dict[str, torch.Tensor]


@dataclasses.dataclass(frozen=True)
class TaskSize:
    """How much of a task one run uses: examples, steps, batch, sequence length."""

    train_examples: int
    eval_examples: int
    steps: int
    batch_size: int
    max_length: int
    latency_batch: int = 8
    latency_repeats: int = 5


@dataclasses.dataclass
class Loaded:
    """A freshly loaded model, its tokenizer (or None) and the device it lives on."""

    model: Any
    tokenizer: Any
    device: torch.device
    task: Any = None  # the LabTask that loaded it (sweeps read label names from it)
    # the attached delta is an infix prefix ([x; INFIX; y]): calls pass infix_position
    infix: bool = False


def _load_causal_lm(model_name: str, device: torch.device) -> Loaded:
    from deltatune import models

    model, tok = models.load(model_name, task="causal-lm")
    models.ensure_pad_token(tok, model)
    return Loaded(model.to(device), tok, device)


class LabTask:
    """Base class of a lab task. Subclasses implement the five hooks below."""

    name: str = ""
    description: str = ""
    model_name: str = ""
    metric: str = ""  # the main metric; higher is better
    dataset: str = ""  # the registered data set (deltatune.datasets) the rows come from
    # base modules trained with every PEFT method (a new task head), via modules_to_save
    head_modules: tuple[str, ...] = ()
    supports_icl: bool = False
    sizes: ClassVar[dict[str, TaskSize]] = {}
    # config values a method gets on this task unless the run overrides them. P-tuning's
    # pseudo tokens are prepended (the peft layout): the lab's inputs carry no [P] slots.
    method_defaults: ClassVar[dict[str, dict[str, Any]]] = {"ptuning": {"placement": "prefix"}}

    def size(self, name: str) -> TaskSize:
        """Return the :class:`TaskSize` called ``name`` (``default`` or ``full``)."""
        try:
            return self.sizes[name]
        except KeyError:
            raise ConfigError(f"task {self.name!r} has no size {name!r}; sizes: "
                              f"{', '.join(self.sizes)}", field="size") from None

    def rows(self, split: str) -> list[dict]:
        """Return the rows of one split of :attr:`dataset` (fields depend on the task)."""
        from deltatune import datasets

        return datasets.load(self.dataset, split)

    def load(self, device: torch.device) -> Loaded:
        """Return a fresh copy of the pretrained model (eval mode) on ``device``."""
        raise NotImplementedError

    def train_batches(self, loaded: Loaded, size: TaskSize, seed: int) -> list[Batch]:
        """Return the shuffled training batches of one run (seeded); each has ``labels``."""
        raise NotImplementedError

    def evaluate(self, model: Any, loaded: Loaded, size: TaskSize) -> dict[str, Any]:
        """Score a (tuned) model on the held-out split; must include :attr:`metric`."""
        raise NotImplementedError

    def latency_batch(self, loaded: Loaded, size: TaskSize) -> Batch:
        """Return the fixed batch used to time one inference forward pass."""
        raise NotImplementedError

    def evaluate_icl(self, loaded: Loaded, size: TaskSize, shots: int, seed: int
                     ) -> tuple[dict[str, Any], Batch]:
        """Score few-shot prompting (no training); return metrics and a latency batch."""
        raise ConfigError(f"task {self.name!r} has no in-context-learning baseline (its model "
                          f"is not a generator)", field="methods")


def count_tokens(batch: Batch) -> int:
    """Return the number of real (non-padding) input tokens in a batch."""
    mask = batch.get("attention_mask")
    if mask is not None:
        return int(mask.sum())
    return int(batch["input_ids"].numel())


def _chunks(items: Sequence[Any], size: int) -> list[Sequence[Any]]:
    return [items[i:i + size] for i in range(0, len(items), size)]


def _epoch_order(n: int, count: int, seed: int) -> list[int]:
    """Indices 0..n-1 in seeded shuffled epochs, as many as ``count`` needs."""
    rng = random.Random(seed)
    out: list[int] = []
    while len(out) < count:
        order = list(range(n))
        rng.shuffle(order)
        out.extend(order)
    return out[:count]


def _balanced(rows: list[dict], n: int, key: str, seed: int) -> list[dict]:
    """Take ``n`` rows with the labels as balanced as the data allows (seeded)."""
    rng = random.Random(seed)
    groups: dict[Any, list[dict]] = {}
    for row in rows:
        groups.setdefault(row[key], []).append(row)
    for g in groups.values():
        rng.shuffle(g)
    out: list[dict] = []
    while len(out) < n and any(groups.values()):
        for label in sorted(groups):
            if groups[label] and len(out) < n:
                out.append(groups[label].pop())
    rng.shuffle(out)
    return out


# -- classification -----------------------------------------------------------------------
class LabelBalancedPools:
    """Training and test pools balanced over the ``label`` field, drawn once with seed 0."""

    def _train_rows(self, size: TaskSize) -> list[dict]:
        # the pool is fixed (seed 0) so every method and seed sees the same examples;
        # the seed changes their order, the model's init, and dropout.
        return _balanced(self.rows("train"), size.train_examples, "label", 0)  # type: ignore[attr-defined]

    def _eval_rows(self, size: TaskSize) -> list[dict]:
        return _balanced(self.rows("test"), size.eval_examples, "label", 0)  # type: ignore[attr-defined]


class ClassificationTask(LabelBalancedPools, LabTask):
    """Text classification with an encoder and a new head; metric: accuracy."""

    metric = "accuracy"
    label_names: tuple[str, ...] = ()

    def _encode(self, loaded: Loaded, rows: Sequence[dict], max_length: int) -> Batch:
        enc = loaded.tokenizer([r["text"] for r in rows], padding=True, truncation=True,
                               max_length=max_length, return_tensors="pt")
        batch = {k: v.to(loaded.device) for k, v in enc.items()}
        batch["labels"] = torch.tensor([self.label_names.index(r["label"]) for r in rows],
                                       device=loaded.device)
        return batch

    def train_batches(self, loaded: Loaded, size: TaskSize, seed: int) -> list[Batch]:
        """Return ``steps`` seeded batches drawn epoch by epoch from the training pool."""
        pool = self._train_rows(size)
        if not pool:
            raise DataError(f"task {self.name!r}: no training rows")
        order = _epoch_order(len(pool), size.steps * size.batch_size, seed)
        return [self._encode(loaded, [pool[i] for i in idx], size.max_length)
                for idx in _chunks(order, size.batch_size)]

    @torch.no_grad()
    def evaluate(self, model: Any, loaded: Loaded, size: TaskSize) -> dict[str, Any]:
        """Return accuracy (and mean loss) on the balanced held-out rows."""
        model.eval()
        rows = self._eval_rows(size)
        correct, loss_sum = 0, 0.0
        for chunk in _chunks(rows, 32):
            batch = self._encode(loaded, chunk, size.max_length)
            out = model(**batch)
            correct += int((out.logits.argmax(-1) == batch["labels"]).sum())
            loss_sum += float(out.loss) * len(chunk)
        return {"accuracy": correct / len(rows), "eval_loss": loss_sum / len(rows)}

    def latency_batch(self, loaded: Loaded, size: TaskSize) -> Batch:
        """Return the first ``latency_batch`` held-out rows, without labels."""
        batch = self._encode(loaded, self._eval_rows(size)[:size.latency_batch],
                             size.max_length)
        batch.pop("labels")
        return batch


class SentimentTask(ClassificationTask):
    """Rotten Tomatoes fresh/rotten snippets with MiniLM-L6 (the SST-2-like task)."""

    name = "sentiment"
    description = ("Rotten Tomatoes critic snippets -> positive/negative, MiniLM-L6 encoder + "
                   "new linear head; accuracy on the test split (movies not seen in training)")
    model_name = "minilm-l6"
    dataset = "rotten-tomatoes"
    label_names = ("negative", "positive")
    head_modules = ("classifier",)
    sizes: ClassVar[dict[str, TaskSize]] = {
        "default": TaskSize(train_examples=1000, eval_examples=256, steps=40, batch_size=16,
                            max_length=48),
        "full": TaskSize(train_examples=10157, eval_examples=1303, steps=3000, batch_size=32,
                         max_length=128, latency_batch=32, latency_repeats=20),
    }

    def load(self, device: torch.device) -> Loaded:
        """Load MiniLM-L6 with a fresh 2-way head (seeded by the caller)."""
        from deltatune import models

        model, tok = models.load(self.model_name, task="sequence-classification",
                                 num_labels=len(self.label_names))
        return Loaded(model.to(device), tok, device)


# -- generation ---------------------------------------------------------------------------
class DefinitionTask(LabTask):
    """WordNet definitions with SmolLM2: SFT on the answer, ROUGE-L on held-out words."""

    name = "definitions"
    description = ("WordNet 3.0 'Define the word X (pos).' -> definition, SmolLM2-135M-Instruct, "
                   "loss on the answer only; ROUGE-L F1 of greedy answers for held-out words")
    model_name = "smollm2-135m-instruct"
    metric = "rougeL"
    dataset = "wordnet-definitions-demo"
    supports_icl = True
    max_new_tokens = 24
    sizes: ClassVar[dict[str, TaskSize]] = {
        "default": TaskSize(train_examples=400, eval_examples=32, steps=30, batch_size=8,
                            max_length=40, latency_batch=8),
        "full": TaskSize(train_examples=4000, eval_examples=300, steps=1500, batch_size=16,
                         max_length=64, latency_batch=16, latency_repeats=20),
    }

    def load(self, device: torch.device) -> Loaded:
        """Load SmolLM2 (causal LM) and give its tokenizer a pad token distinct from eos."""
        return _load_causal_lm(self.model_name, device)

    @staticmethod
    def prompt_text(row: dict) -> str:
        """The text the model is given; the answer follows it directly."""
        return f"{row['prompt']}\nDefinition:"

    def _encode_sft(self, loaded: Loaded, rows: Sequence[dict], max_length: int) -> Batch:
        tok = loaded.tokenizer
        ids, labels, prompts = [], [], []
        for row in rows:
            p = tok(self.prompt_text(row), add_special_tokens=False)["input_ids"]
            prompts.append(p)
            a = tok(" " + row["response"], add_special_tokens=False)["input_ids"]
            a = [*a, tok.eos_token_id]
            seq = (p + a)[:max_length]
            lab = ([-100] * len(p) + a)[:max_length]
            ids.append(seq)
            labels.append(lab)
        width = max(len(s) for s in ids)
        pad = tok.pad_token_id
        batch = {
            "input_ids": torch.tensor([s + [pad] * (width - len(s)) for s in ids]),
            "attention_mask": torch.tensor([[1] * len(s) + [0] * (width - len(s))
                                            for s in ids]),
            "labels": torch.tensor([lab + [-100] * (width - len(lab)) for lab in labels]),
        }
        if loaded.infix:  # y (the answer) starts after the prompt; only y sees the infix
            batch["infix_position"] = torch.tensor([min(len(p), max_length) for p in prompts])
        return {k: v.to(loaded.device) for k, v in batch.items()}

    def _train_rows(self, size: TaskSize) -> list[dict]:
        rows = self.rows("train")
        return rows[:size.train_examples]

    def _eval_rows(self, size: TaskSize) -> list[dict]:
        return self.rows("test")[:size.eval_examples]

    def train_batches(self, loaded: Loaded, size: TaskSize, seed: int) -> list[Batch]:
        """Return ``steps`` seeded batches of prompt+answer with the prompt masked out."""
        pool = self._train_rows(size)
        order = _epoch_order(len(pool), size.steps * size.batch_size, seed)
        return [self._encode_sft(loaded, [pool[i] for i in idx], size.max_length)
                for idx in _chunks(order, size.batch_size)]

    def _generate(self, model: Any, loaded: Loaded, prompts: list[str]) -> list[str]:
        tok = loaded.tokenizer
        tok.padding_side = "left"  # generation continues every row from its last token
        try:
            enc = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
        finally:
            tok.padding_side = "right"
        enc = {k: v.to(loaded.device) for k, v in enc.items()}
        if loaded.infix:  # left padding: every row's answer starts at the same index
            enc["infix_position"] = torch.full((enc["input_ids"].shape[0],),
                                               enc["input_ids"].shape[1], device=loaded.device)
        out = model.generate(**enc, max_new_tokens=self.max_new_tokens, do_sample=False,
                             pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
        texts = tok.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
        # an answer is one line: few-shot prompts make models continue with the next item
        return [t.strip().split("\n")[0].strip() for t in texts]

    @staticmethod
    def rouge_l(predictions: Sequence[str], rows: Sequence[dict]) -> float:
        """Mean ROUGE-L F1 against the word's senses (the best-matching one counts)."""
        from deltatune.metrics import rouge_l

        return rouge_l(list(predictions),
                       [row.get("references") or [row["response"]] for row in rows])

    @torch.no_grad()
    def evaluate(self, model: Any, loaded: Loaded, size: TaskSize) -> dict[str, Any]:
        """Return ROUGE-L of greedy answers and the mean answer-token loss."""
        model.eval()
        rows = self._eval_rows(size)
        preds: list[str] = []
        loss_sum, n = 0.0, 0
        for chunk in _chunks(rows, 16):
            preds.extend(self._generate(model, loaded, [self.prompt_text(r) for r in chunk]))
            batch = self._encode_sft(loaded, chunk, size.max_length)
            loss_sum += float(model(**batch).loss) * len(chunk)
            n += len(chunk)
        return {"rougeL": self.rouge_l(preds, rows), "eval_loss": loss_sum / n,
                "example": f"{rows[0]['prompt']} -> {preds[0]}"}

    def latency_batch(self, loaded: Loaded, size: TaskSize) -> Batch:
        """Return the prompts of the first held-out rows (a prefill forward pass)."""
        batch = self._encode_sft(loaded, self._eval_rows(size)[:size.latency_batch],
                                 size.max_length)
        batch.pop("labels")
        return batch

    def icl_prompt(self, row: dict, demos: Sequence[dict]) -> str:
        """Few-shot prompt: ``demos`` answered in the training format, then ``row``."""
        shots = "".join(f"{self.prompt_text(d)} {d['response']}\n\n" for d in demos)
        return shots + self.prompt_text(row)

    @torch.no_grad()
    def evaluate_icl(self, loaded: Loaded, size: TaskSize, shots: int, seed: int
                     ) -> tuple[dict[str, Any], Batch]:
        """Score ``shots``-shot prompting of the untuned model (demonstrations drawn per seed)."""
        model = loaded.model.eval()
        pool = self._train_rows(size)
        rng = random.Random(seed)
        demos = rng.sample(pool, shots)
        rows = self._eval_rows(size)
        preds: list[str] = []
        for chunk in _chunks(rows, 16):
            preds.extend(self._generate(model, loaded,
                                        [self.icl_prompt(r, demos) for r in chunk]))
        tok = loaded.tokenizer
        enc = tok([self.icl_prompt(r, demos) for r in rows[:size.latency_batch]],
                  return_tensors="pt", padding=True, add_special_tokens=False)
        batch = {k: v.to(loaded.device) for k, v in enc.items()}
        return ({"rougeL": self.rouge_l(preds, rows), "shots": float(shots),
                 "example": f"{rows[0]['prompt']} -> {preds[0]}"}, batch)


# -- classification through a causal LM's label words ------------------------------------
class PromptSentimentTask(LabelBalancedPools, LabTask):
    """Rotten Tomatoes scored by SmolLM2 through a template and a verbaliser (no new head).

    The hand-written template is ``"Review: {text}\nSentiment:"`` and the verbaliser maps
    negative/positive to the first token of " negative" / " positive": the class scores
    are the LM's logits of those two tokens after "Sentiment:". Trained methods learn to
    put the right word there (loss: the LM's cross-entropy on that one token). ``manual``
    (0-shot) and ``icl`` (k-shot) score the untuned model through the same template.
    """

    name = "sentiment-lm"
    description = ("Rotten Tomatoes critic snippets -> ' positive'/' negative' after a manual "
                   "template 'Review: {text}\\nSentiment:', SmolLM2-135M-Instruct, label-word "
                   "logits; accuracy on held-out movies")
    model_name = "smollm2-135m-instruct"
    metric = "accuracy"
    dataset = "rotten-tomatoes"
    supports_icl = True
    template = "Review: {text}\nSentiment:"
    label_names = ("negative", "positive")
    verbalizer: ClassVar[dict[str, str]] = {"negative": " negative", "positive": " positive"}
    sizes: ClassVar[dict[str, TaskSize]] = {
        "default": TaskSize(train_examples=1000, eval_examples=120, steps=30, batch_size=8,
                            max_length=64),
        "full": TaskSize(train_examples=10157, eval_examples=1303, steps=2000, batch_size=16,
                         max_length=128, latency_batch=16, latency_repeats=20),
    }

    def load(self, device: torch.device) -> Loaded:
        """Load SmolLM2 (causal LM) and give its tokenizer a pad token distinct from eos."""
        return _load_causal_lm(self.model_name, device)

    def label_token_ids(self, tokenizer: Any) -> list[int]:
        """First token of each label word, in :attr:`label_names` order."""
        ids = [tokenizer(self.verbalizer[n], add_special_tokens=False)["input_ids"][0]
               for n in self.label_names]
        if len(set(ids)) != len(ids):
            raise ConfigError("two label words start with the same token", field="verbalizer")
        return ids

    def _prompt_ids(self, tokenizer: Any, row: dict, max_length: int, demos: str = "") -> list[int]:
        # the review is cut, never the template: the label word must follow "Sentiment:"
        head, _, tail = self.template.partition("{text}")
        text = tokenizer(" " + row["text"].strip(), add_special_tokens=False)["input_ids"]
        pre = tokenizer(demos + head.rstrip(), add_special_tokens=False)["input_ids"]
        post = tokenizer(tail, add_special_tokens=False)["input_ids"]
        room = max(1, max_length - len(post) - 1 - (0 if demos else len(pre)))
        return pre + text[:room] + post

    def _pad(self, loaded: Loaded, seqs: list[list[int]], labels: list[list[int]] | None
             ) -> Batch:
        pad = loaded.tokenizer.pad_token_id
        width = max(len(q) for q in seqs)
        batch = {"input_ids": torch.tensor([q + [pad] * (width - len(q)) for q in seqs]),
                 "attention_mask": torch.tensor([[1] * len(q) + [0] * (width - len(q))
                                                 for q in seqs])}
        if labels is not None:
            batch["labels"] = torch.tensor([y + [-100] * (width - len(y)) for y in labels])
        return {k: v.to(loaded.device) for k, v in batch.items()}

    def _encode_train(self, loaded: Loaded, rows: Sequence[dict], max_length: int) -> Batch:
        label_ids = self.label_token_ids(loaded.tokenizer)
        seqs, labels = [], []
        for row in rows:
            prompt = self._prompt_ids(loaded.tokenizer, row, max_length)
            word = label_ids[self.label_names.index(row["label"])]
            seqs.append([*prompt, word])
            labels.append([-100] * len(prompt) + [word])
        return self._pad(loaded, seqs, labels)

    def train_batches(self, loaded: Loaded, size: TaskSize, seed: int) -> list[Batch]:
        """Return ``steps`` seeded batches of prompt + label word (only the word is scored)."""
        pool = self._train_rows(size)
        order = _epoch_order(len(pool), size.steps * size.batch_size, seed)
        return [self._encode_train(loaded, [pool[i] for i in idx], size.max_length)
                for idx in _chunks(order, size.batch_size)]

    @torch.no_grad()
    def _score(self, model: Any, loaded: Loaded, prompts: list[list[int]]) -> torch.Tensor:
        """Label-word logits (rows, classes) at each prompt's last token."""
        model.eval()
        label_ids = self.label_token_ids(loaded.tokenizer)
        out = []
        for chunk in _chunks(prompts, 16):
            batch = self._pad(loaded, list(chunk), None)
            logits = model(**batch).logits
            last = batch["attention_mask"].sum(1) - 1
            rows = torch.arange(len(last), device=last.device)
            out.append(logits[rows, last][:, label_ids].float().cpu())
        return torch.cat(out)

    def _metrics(self, scores: torch.Tensor, rows: Sequence[dict]) -> dict[str, Any]:
        gold = torch.tensor([self.label_names.index(r["label"]) for r in rows])
        pred = scores.argmax(-1)
        loss = torch.nn.functional.cross_entropy(scores, gold)
        return {"accuracy": float((pred == gold).float().mean()),
                "label_word_loss": float(loss),
                "predicted_positive": float(pred.float().mean())}

    def evaluate(self, model: Any, loaded: Loaded, size: TaskSize) -> dict[str, Any]:
        """Accuracy of the label word with the higher logit on the balanced held-out rows."""
        rows = self._eval_rows(size)
        prompts = [self._prompt_ids(loaded.tokenizer, r, size.max_length) for r in rows]
        return self._metrics(self._score(model, loaded, prompts), rows)

    def latency_batch(self, loaded: Loaded, size: TaskSize) -> Batch:
        """The prompts of the first held-out rows (one forward pass scores them)."""
        rows = self._eval_rows(size)[:size.latency_batch]
        return self._pad(loaded, [self._prompt_ids(loaded.tokenizer, r, size.max_length)
                                  for r in rows], None)

    def demonstrations(self, size: TaskSize, shots: int, seed: int) -> str:
        """``shots`` answered training rows (labels balanced, drawn per seed) as text."""
        demos = _balanced(self._train_rows(size), shots, "label", seed)
        return "".join(self.template.format(text=d["text"].strip()) + " " + d["label"] + "\n\n"
                       for d in demos)

    def evaluate_icl(self, loaded: Loaded, size: TaskSize, shots: int, seed: int
                     ) -> tuple[dict[str, Any], Batch]:
        """Score the untuned model: 0 shots is the manual prompt, k shots adds demonstrations."""
        demos = self.demonstrations(size, shots, seed) if shots else ""
        rows = self._eval_rows(size)
        prompts = [self._prompt_ids(loaded.tokenizer, r, size.max_length, demos) for r in rows]
        metrics = self._metrics(self._score(loaded.model, loaded, prompts), rows)
        metrics["shots"] = float(shots)
        return metrics, self._pad(loaded, prompts[:size.latency_batch], None)


# -- sequence labelling -------------------------------------------------------------------
class TermSpanTask(LabTask):
    """BIO spans of a query word in WordNet example sentences, typed by part of speech.

    Input: ``[CLS] query [SEP] sentence [SEP]``; the head tags every sentence word on its
    first sub-token (other sub-tokens and the query are not scored), as in the P-tuning v2
    paper's sequence labelling (a per-token linear head) and SRL's marked predicate.
    """

    name = "term-spans"
    description = ("WordNet 3.0 example sentences: tag the query word's verbatim occurrences "
                   "as BIO spans typed by POS (labels exact by construction), MiniLM-L6 + new "
                   "per-token head; span F1 on held-out words")
    model_name = "minilm-l6"
    metric = "span_f1"
    dataset = "wordnet-term-spans"
    head_modules = ("classifier",)
    sizes: ClassVar[dict[str, TaskSize]] = {
        "default": TaskSize(train_examples=2000, eval_examples=400, steps=60, batch_size=16,
                            max_length=32),
        "full": TaskSize(train_examples=31401, eval_examples=3925, steps=3000, batch_size=32,
                         max_length=64, latency_batch=32, latency_repeats=20),
    }

    @property
    def label_names(self) -> tuple[str, ...]:
        """The tag set, ``O`` first (index = the head's output unit)."""
        from deltatune.datasets.wordnet import TERM_TAGS

        return TERM_TAGS

    def load(self, device: torch.device) -> Loaded:
        """Load MiniLM-L6 with a fresh per-token head over the tag set."""
        from deltatune import models

        names = self.label_names
        model, tok = models.load(self.model_name, task="token-classification",
                                 num_labels=len(names),
                                 id2label=dict(enumerate(names)),
                                 label2id={n: i for i, n in enumerate(names)})
        return Loaded(model.to(device), tok, device)

    def encode(self, loaded: Loaded, rows: Sequence[dict], max_length: int
               ) -> tuple[Batch, list[list[int]]]:
        """Encode (query, sentence) pairs; return the batch and, per row, the position of
        each sentence word's first sub-token (shorter when truncation cut words off)."""
        from deltatune.datasets.wordnet import tokenize
        from deltatune.tasks.base import IGNORE

        enc = loaded.tokenizer([tokenize(r["query"]) for r in rows], [r["tokens"] for r in rows],
                               is_split_into_words=True, truncation="only_second",
                               max_length=max_length, padding=True, return_tensors="pt")
        names = self.label_names
        labels = torch.full(enc["input_ids"].shape, IGNORE, dtype=torch.long)
        firsts: list[list[int]] = []
        for i, row in enumerate(rows):
            seen: set[int] = set()
            pos: list[int] = []
            for j, (w, seq) in enumerate(zip(enc.word_ids(i), enc.sequence_ids(i))):
                if seq != 1 or w is None or w in seen:
                    continue
                seen.add(w)
                pos.append(j)
                labels[i, j] = names.index(row["tags"][w])
            firsts.append(pos)
        batch = {k: v.to(loaded.device) for k, v in enc.items()}
        batch["labels"] = labels.to(loaded.device)
        return batch, firsts

    def _train_rows(self, size: TaskSize) -> list[dict]:
        # a fixed pool (seed 0) shared by every method and seed, as in ClassificationTask
        rows = list(self.rows("train"))
        random.Random(0).shuffle(rows)
        return rows[:size.train_examples]

    def _eval_rows(self, size: TaskSize) -> list[dict]:
        return self.rows("test")[:size.eval_examples]

    def train_batches(self, loaded: Loaded, size: TaskSize, seed: int) -> list[Batch]:
        """Return ``steps`` seeded batches drawn epoch by epoch from the training pool."""
        pool = self._train_rows(size)
        order = _epoch_order(len(pool), size.steps * size.batch_size, seed)
        return [self.encode(loaded, [pool[i] for i in idx], size.max_length)[0]
                for idx in _chunks(order, size.batch_size)]

    @torch.no_grad()
    def predict(self, model: Any, loaded: Loaded, rows: Sequence[dict], max_length: int
                ) -> tuple[list[list[str]], float]:
        """Predicted tags per sentence word (``O`` past truncation) and the summed loss."""
        model.eval()
        names = self.label_names
        preds: list[list[str]] = []
        loss_sum = 0.0
        for chunk in _chunks(rows, 32):
            batch, firsts = self.encode(loaded, chunk, max_length)
            out = model(**batch)
            loss_sum += float(out.loss) * len(chunk)
            best = out.logits.argmax(-1).tolist()
            for row, pos, ids in zip(chunk, firsts, best):
                tags = [names[ids[j]] for j in pos]
                preds.append(tags + ["O"] * (len(row["tokens"]) - len(tags)))
        return preds, loss_sum

    def evaluate(self, model: Any, loaded: Loaded, size: TaskSize) -> dict[str, Any]:
        """Return span F1 (exact typed spans), word accuracy and the mean loss."""
        from deltatune import metrics

        rows = self._eval_rows(size)
        preds, loss_sum = self.predict(model, loaded, rows, size.max_length)
        gold = [r["tags"] for r in rows]
        return {"span_f1": metrics.span_f1(preds, gold),
                "word_accuracy": metrics.accuracy([t for p in preds for t in p],
                                                  [t for g in gold for t in g]),
                "eval_loss": loss_sum / len(rows)}

    def latency_batch(self, loaded: Loaded, size: TaskSize) -> Batch:
        """Return the first ``latency_batch`` held-out rows, without labels."""
        batch, _ = self.encode(loaded, self._eval_rows(size)[:size.latency_batch],
                               size.max_length)
        batch.pop("labels")
        return batch


_TASKS: dict[str, Callable[[], LabTask]] = {
    "sentiment": SentimentTask,
    "definitions": DefinitionTask,
    "term-spans": TermSpanTask,
    "sentiment-lm": PromptSentimentTask,
}


def register_task(name: str, factory: Callable[[], LabTask]) -> None:
    """Make a task available to :func:`get_task` (tests register tiny ones)."""
    _TASKS[name] = factory


# the data set's name works too
TASK_ALIASES = {"rotten-tomatoes": "sentiment", "wordnet-definitions": "definitions",
                "wordnet-definitions-demo": "definitions", "wordnet-term-spans": "term-spans"}


def get_task(name: str, model: str | None = None) -> LabTask:
    """Return a fresh instance of the task called ``name`` (or named by its data set).

    ``model`` replaces the task's model (a built-in name such as ``gemma3-270m``, or a
    local Hugging Face model directory); it must have the head the task loads
    (causal LM for ``definitions``/``sentiment-lm``, sequence or token classification for
    ``sentiment``/``term-spans``), which is checked when the model loads.
    """
    name = TASK_ALIASES.get(name, name)
    try:
        task = _TASKS[name]()
    except KeyError:
        raise ConfigError(f"unknown lab task {name!r}; built-in tasks: {', '.join(_TASKS)}",
                          field="task") from None
    if model:
        task.model_name = model
    return task


def list_tasks() -> list[LabTask]:
    """Return one instance of every registered task."""
    return [f() for f in _TASKS.values()]
