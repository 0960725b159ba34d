"""Evaluation metrics: classification, tagging, generation and language modelling.

    from deltatune import metrics
    metrics.accuracy([1, 0, 2], [1, 1, 2])            # 0.666...
    metrics.macro_f1(preds, labels)                    # unweighted mean of per-class F1
    metrics.span_f1(pred_tags, gold_tags)              # CoNLL-style exact-span F1 (BIO)
    metrics.exact_match(["Paris"], ["paris"])          # after SQuAD-style normalisation
    metrics.rouge_l(preds, refs)                       # rouge-score's ROUGE-L F1, mean
    metrics.bleu(preds, refs)                          # sacrebleu corpus BLEU (0-100)
    metrics.perplexity(total_nll, n_tokens)            # exp(mean token negative log-lik.)

Every function returns a plain float. ROUGE-L and BLEU come from the maintained
``rouge-score`` and ``sacrebleu`` packages rather than our own code, so the numbers
match what papers report with those tools. A reference may be a string or a list of
strings (several references: ROUGE-L takes the best-matching one per example, BLEU
uses all of them).
"""

from __future__ import annotations

import math
import re
import string
from collections.abc import Hashable, Sequence

from deltatune.core.errors import DataError

Refs = Sequence[str | Sequence[str]]


def _same_length(a: Sequence, b: Sequence, what: str) -> None:
    if len(a) != len(b):
        raise DataError(f"{what}: {len(a)} predictions but {len(b)} references; pass one "
                        f"reference per prediction")
    if not a:
        raise DataError(f"{what}: no examples to score")


def accuracy(predictions: Sequence[Hashable], labels: Sequence[Hashable]) -> float:
    """Return the fraction of predictions equal to their label."""
    _same_length(predictions, labels, "accuracy")
    return sum(p == y for p, y in zip(predictions, labels)) / len(labels)


def macro_f1(predictions: Sequence[Hashable], labels: Sequence[Hashable]) -> float:
    """Return the unweighted mean over classes of F1 (classes = union of gold and predicted).

    A class with no gold and no predicted example never appears; a class that only
    appears on one side scores F1 = 0, as in scikit-learn's ``f1_score(average='macro')``.
    """
    _same_length(predictions, labels, "macro_f1")
    classes = sorted(set(labels) | set(predictions), key=repr)
    scores = []
    for c in classes:
        tp = sum(p == c and y == c for p, y in zip(predictions, labels))
        fp = sum(p == c and y != c for p, y in zip(predictions, labels))
        fn = sum(p != c and y == c for p, y in zip(predictions, labels))
        scores.append(0.0 if tp == 0 else 2 * tp / (2 * tp + fp + fn))
    return sum(scores) / len(scores)


def bio_spans(tags: Sequence[str]) -> set[tuple[str, int, int]]:
    """Return the entity spans of one BIO tag sequence as (type, start, end-exclusive).

    An ``I-X`` that does not continue an ``X`` span starts a new span (the lenient
    CoNLL ``conlleval`` rule); ``O`` and anything else close the open span.
    """
    spans: set[tuple[str, int, int]] = set()
    kind, start = None, 0
    for i, tag in enumerate([*tags, "O"]):
        prefix, _, label = tag.partition("-")
        continues = prefix == "I" and label == kind
        if kind is not None and not continues:
            spans.add((kind, start, i))
            kind = None
        if prefix == "B" or (prefix == "I" and not continues):
            kind, start = label, i
    return spans


def span_f1(predictions: Sequence[Sequence[str]], labels: Sequence[Sequence[str]]) -> float:
    """Return micro F1 over exact entity spans of BIO-tagged sequences (CoNLL convention).

    A span counts as correct only when its type, start and end all match.
    Returns 0.0 when neither side has any span.
    """
    _same_length(predictions, labels, "span_f1")
    tp = n_pred = n_gold = 0
    for i, (p, y) in enumerate(zip(predictions, labels)):
        if len(p) != len(y):
            raise DataError(f"span_f1: sequence {i} has {len(p)} predicted tags and {len(y)} "
                            f"gold tags")
        ps, ys = bio_spans(p), bio_spans(y)
        tp += len(ps & ys)
        n_pred += len(ps)
        n_gold += len(ys)
    if tp == 0:
        return 0.0
    precision, recall = tp / n_pred, tp / n_gold
    return 2 * precision * recall / (precision + recall)


def normalize_answer(text: str) -> str:
    """SQuAD normalisation: lower case, drop punctuation and articles, squeeze spaces."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in set(string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def _as_list(ref: str | Sequence[str]) -> list[str]:
    return [ref] if isinstance(ref, str) else list(ref)


def exact_match(predictions: Sequence[str], references: Refs) -> float:
    """Return the fraction of predictions equal to (any of) their reference(s) after
    :func:`normalize_answer`."""
    _same_length(predictions, references, "exact_match")
    hits = sum(any(normalize_answer(p) == normalize_answer(r) for r in _as_list(refs))
               for p, refs in zip(predictions, references))
    return hits / len(predictions)


def rouge_l(predictions: Sequence[str], references: Refs) -> float:
    """Return the mean ROUGE-L F1 (``rouge-score``, no stemming; 0-1) of the predictions.

    With several references per example the best-scoring one counts
    (``RougeScorer.score_multi``).
    """
    from rouge_score import rouge_scorer

    _same_length(predictions, references, "rouge_l")
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    total = 0.0
    for p, refs in zip(predictions, references):
        total += scorer.score_multi(_as_list(refs), p)["rougeL"].fmeasure
    return total / len(predictions)


def bleu(predictions: Sequence[str], references: Refs) -> float:
    """Return sacrebleu's corpus BLEU (0-100, default 13a tokenisation).

    Examples may have different numbers of references; missing ones are padded with
    ``None``, which sacrebleu skips.
    """
    import sacrebleu

    _same_length(predictions, references, "bleu")
    refs = [_as_list(r) for r in references]
    width = max(len(r) for r in refs)
    streams = [[r[k] if k < len(r) else None for r in refs] for k in range(width)]
    return float(sacrebleu.corpus_bleu(list(predictions), streams).score)


def perplexity(total_nll: float, n_tokens: int) -> float:
    """Return exp(total negative log-likelihood / number of tokens), the token perplexity."""
    if n_tokens <= 0:
        raise DataError("perplexity: no tokens were scored (every label is masked?)")
    return math.exp(total_nll / n_tokens)


METRICS = {
    "accuracy": accuracy, "macro_f1": macro_f1, "span_f1": span_f1,
    "exact_match": exact_match, "rouge_l": rouge_l, "bleu": bleu,
}
