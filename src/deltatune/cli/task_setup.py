"""What ``deltatune train`` and ``eval`` share about tasks (not a subcommand itself).

For each task name: which model head to load, which columns a row needs, which options
the task takes, and how the label set is found. Both commands check the data's columns
before loading the model, so a wrong file fails in a second with the file, the line
and the columns it does have.

| task | model loaded as | columns |
|---|---|---|
| ``causal-lm-sft`` | causal LM | ``prompt`` + ``response``, or ``messages`` |
| ``causal-lm`` | causal LM | ``text`` |
| ``sequence-classification`` | new head (causal LM with a verbaliser) | ``text``, ``label`` |
| ``token-classification`` | a new per-token head | ``tokens``, ``tags`` |
| ``seq2seq`` | encoder-decoder LM | ``source``, ``target`` |
| ``multiple-choice`` | causal LM | ``prompt``, ``choices``, ``label`` |

A new head (the weights the checkpoint lacks) is trained in full with the delta: its
modules are added to the method's ``modules_to_save`` unless the run sets that field,
and saved with the delta, so ``eval`` reloads it from the delta directory.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from deltatune.core.errors import ConfigError, DataError

TASK_NAMES = ("causal-lm-sft", "causal-lm", "sequence-classification", "token-classification",
              "seq2seq", "multiple-choice")
DEFAULT_TASK = "causal-lm-sft"
# models.load(task=...) for each task (sequence classification with a verbaliser: causal LM)
MODEL_TASK = {"causal-lm-sft": "causal-lm", "causal-lm": "causal-lm",
              "sequence-classification": "sequence-classification",
              "token-classification": "token-classification", "seq2seq": "seq2seq-lm",
              "multiple-choice": "causal-lm"}
# task option naming a column -> the column's default name, per task
COLUMN_OPTIONS = {
    "causal-lm-sft": {"prompt_column": "prompt", "response_column": "response"},
    "causal-lm": {"text_column": "text"},
    "sequence-classification": {"text_column": "text", "label_column": "label"},
    "token-classification": {"tokens_column": "tokens", "tags_column": "tags"},
    "seq2seq": {"source_column": "source", "target_column": "target"},
    "multiple-choice": {"prompt_column": "prompt", "choices_column": "choices",
                        "label_column": "label"},
}
RUN_FILE = "run.yaml"


def task_class(name: str) -> Any:
    """The task class called ``name``; an unknown name is a :class:`ConfigError` listing all."""
    from deltatune.tasks import ALL_TASKS

    if name not in TASK_NAMES:
        raise ConfigError(f"unknown task {name!r}; choose one of: {', '.join(TASK_NAMES)}",
                          field="task")
    return ALL_TASKS[name]


def check_options(name: str, options: dict[str, Any]) -> dict[str, Any]:
    """Return ``options`` if task ``name`` takes every one; else a :class:`ConfigError`."""
    params = inspect.signature(task_class(name).__init__).parameters
    takes = sorted(p for p, v in params.items()
                   if v.kind == inspect.Parameter.KEYWORD_ONLY and p != "model")
    bad = sorted(k for k in options if k not in takes)
    if bad:
        raise ConfigError(f"option(s) {', '.join(bad)} do not apply to task {name!r}; its "
                          f"options: {', '.join(takes)}", field=bad[0])
    return options


def check_columns(name: str, options: dict[str, Any], rows: Sequence[dict[str, Any]]) -> None:
    """Raise a :class:`DataError` at the first row lacking a column task ``name`` needs.

    The message names the file and line, the columns that row has, and the ``--column``
    flag that maps a column of the file to the expected name.
    """
    needed = [options.get(opt, default) for opt, default in COLUMN_OPTIONS[name].items()]
    messages = options.get("messages_column", "messages") if name == "causal-lm-sft" else None
    locate = getattr(rows, "where", None)
    for i, row in enumerate(rows):
        if messages is not None and messages in row:
            continue
        missing = [c for c in needed if c not in row]
        if missing:
            where = locate(i) if callable(locate) else f"row {i + 1}"
            have = ", ".join(map(str, row)) or "none"
            alt = f" (or {messages!r})" if messages is not None else ""
            raise DataError(
                f"{where}: no column {', '.join(map(repr, missing))}{alt}, which task {name!r} "
                f"needs; this row's columns: {have}. Map a column of the file onto it with "
                f"--column YOURS={missing[0]}")


def label_set(name: str, options: dict[str, Any], rows: Sequence[dict[str, Any]]
              ) -> list[Any] | None:
    """The class names of a classification task, in head order; None for other tasks.

    ``labels`` in ``options`` wins; else sequence classification takes the verbaliser's
    labels or the sorted labels of ``rows``, token classification ``O`` then the sorted
    other tags of ``rows`` (the same rules as the task classes).
    """
    from deltatune.tasks import SequenceClassification, TokenClassification

    if options.get("labels") is not None:
        labels = list(options["labels"])
        if not labels:
            raise ConfigError("labels is empty; give the class names, e.g. --labels neg,pos",
                              field="labels")
        return labels
    if name == "sequence-classification":
        if options.get("verbalizer"):
            return list(options["verbalizer"])
        return SequenceClassification.label_set(rows, options.get("label_column", "label"))
    if name == "token-classification":
        return TokenClassification.tag_set(rows, options.get("tags_column", "tags"))
    return None


def model_task(name: str, options: dict[str, Any]) -> str:
    """The ``models.load`` task (model head) that task ``name`` trains."""
    if name == "sequence-classification" and options.get("verbalizer"):
        return "causal-lm"
    return MODEL_TASK[name]


def load_model(model_name: str, name: str, options: dict[str, Any]) -> tuple[Any, Any]:
    """Load the model with the head task ``name`` needs (sized to ``options['labels']``)."""
    from deltatune import models

    kind = model_task(name, options)
    kw: dict[str, Any] = {}
    labels = options.get("labels")
    if kind in ("sequence-classification", "token-classification"):
        kw["num_labels"] = len(labels)
        kw["id2label"] = {i: str(lab) for i, lab in enumerate(labels)}
        kw["label2id"] = {str(lab): i for i, lab in enumerate(labels)}
    return models.load(model_name, task=kind, **kw)


def head_modules(model: Any) -> list[str]:
    """Modules holding the weights the checkpoint lacked (a new head), for modules_to_save.

    A top-level module of the model (``classifier``, ``score``) is named as such; a new
    module inside the base model (a missing pooler) by its full path.
    """
    prefix = getattr(model, "base_model_prefix", "") or ""
    out: list[str] = []
    for weight in getattr(model, "deltatune_new_weights", []) or []:
        module = weight.rpartition(".")[0]
        if not module:
            continue
        top = module.split(".")[0]
        name = module if top == prefix else top
        if name not in out:
            out.append(name)
    return out


def build_task(name: str, tokenizer: Any, model: Any, options: dict[str, Any]) -> Any:
    """Construct task ``name`` with ``options`` (``model`` goes to the tasks that take it)."""
    cls = task_class(name)
    check_options(name, options)
    params = inspect.signature(cls.__init__).parameters
    extra = {"model": model} if "model" in params else {}
    return cls(tokenizer, **extra, **options)


def run_file_near(delta: str | None) -> Path | None:
    """The run file written by ``deltatune train`` next to a delta directory, if any.

    ``train`` saves deltas to ``OUT/adapter`` and ``OUT/best`` and the run file to
    ``OUT/run.yaml``; a directory holding ``run.yaml`` itself counts too.
    """
    if not delta:
        return None
    here = Path(delta)
    for candidate in (here / RUN_FILE, here.parent / RUN_FILE):
        if candidate.is_file():
            return candidate
    return None
