"""Metrics against hand computations."""

from __future__ import annotations

import math

import pytest

from deltatune import metrics
from deltatune.core.errors import DataError


def test_accuracy_and_macro_f1_by_hand():
    preds, gold = [0, 0, 1, 2, 2, 2], [0, 1, 1, 2, 2, 0]
    assert metrics.accuracy(preds, gold) == pytest.approx(4 / 6)
    # class 0: tp1 fp1 fn1 -> 0.5; class 1: tp1 fp0 fn1 -> 2/3; class 2: tp2 fp1 fn0 -> 0.8
    assert metrics.macro_f1(preds, gold) == pytest.approx((0.5 + 2 / 3 + 0.8) / 3)


def test_span_f1_counts_exact_spans_only():
    gold = [["B-PER", "I-PER", "O", "B-LOC"], ["O", "B-ORG", "I-ORG", "I-ORG"]]
    pred = [["B-PER", "I-PER", "O", "B-ORG"], ["O", "B-ORG", "I-ORG", "O"]]
    # gold spans: PER(0,2) LOC(3,4) ORG(1,4); predicted: PER(0,2) ORG(3,4) ORG(1,3) -> 1 hit
    assert metrics.bio_spans(gold[1]) == {("ORG", 1, 4)}
    assert metrics.span_f1(pred, gold) == pytest.approx(1 / 3)
    # a stray I- opens a span (conlleval)
    assert metrics.bio_spans(["O", "I-X", "I-X", "B-Y"]) == {("X", 1, 3), ("Y", 3, 4)}


def test_exact_match_normalises_case_punctuation_and_articles():
    assert metrics.exact_match(["The Cat!", "dog"], ["cat", ["a bird", "Dog."]]) == 1.0
    assert metrics.exact_match(["cat"], ["cats"]) == 0.0


def test_rouge_l_is_the_lcs_f_measure():
    # LCS("the cat sat", "the cat was sitting") = 2 -> P = 2/3, R = 2/4
    p, r = 2 / 3, 2 / 4
    assert metrics.rouge_l(["the cat sat"], ["the cat was sitting"]) == \
        pytest.approx(2 * p * r / (p + r))
    # several references: the best one counts
    assert metrics.rouge_l(["a b"], [["x y", "a b"]]) == pytest.approx(1.0)


def test_bleu_perfect_and_zero():
    assert metrics.bleu(["the cat sat on the mat"], ["the cat sat on the mat"]) == \
        pytest.approx(100.0)
    assert metrics.bleu(["zzz yyy xxx www"], ["a b c d"]) == pytest.approx(0.0)
    # uneven numbers of references are allowed
    assert metrics.bleu(["a b c d e", "f g h i j"], [["a b c d e", "q"], ["f g h i j"]]) == \
        pytest.approx(100.0)


def test_perplexity_and_errors():
    assert metrics.perplexity(6.0, 3) == pytest.approx(math.exp(2.0))
    with pytest.raises(DataError, match="no tokens"):
        metrics.perplexity(0.0, 0)
    with pytest.raises(DataError, match="2 predictions but 1 references"):
        metrics.accuracy([1, 2], [1])
