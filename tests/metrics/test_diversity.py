"""distinct-n, self-BLEU and response length against hand computations."""

import math

import pytest
from torchmetrics.functional.text import bleu_score

from lightning_irl.metrics import DistinctN, ResponseLength, SelfBLEU
from lightning_irl.metrics.functional import distinct_n, groups_of, self_bleu


def test_distinct_n_by_hand():
    texts = ["a b a", "a b c"]
    assert distinct_n(texts, 1) == (3, 6)  # a, b, c of a b a a b c
    assert distinct_n(texts, 2) == (3, 4)  # ab, ba, bc of ab ba ab bc
    assert distinct_n(["a"], 2) == (0, 0)


def test_distinct_n_metric_averages_per_prompt_groups():
    metric = DistinctN(1)
    metric.update([["a a", "a a"], ["a b", "c d"]])  # 1/4 and 4/4
    metric.update([["x"]])  # 1/1
    assert float(metric.compute()) == pytest.approx((0.25 + 1.0 + 1.0) / 3)
    bigrams = DistinctN(2)
    bigrams.update([["a", "b"]])  # no bigrams at all: skipped
    assert math.isnan(float(bigrams.compute()))


def test_sentence_bleu_by_hand():
    # p1 = 5/6, p2 = 3/5, p3 = 2/4, p4 = 1/3, equal lengths (no brevity penalty)
    scores = self_bleu(["the cat sat on the mat", "the cat sat on a mat"])
    by_hand = (5 / 6 * 3 / 5 * 2 / 4 * 1 / 3) ** 0.25
    assert scores[0] == pytest.approx(by_hand, rel=1e-5)
    # and it is torchmetrics' corpus BLEU of that one hypothesis
    assert scores[1] == pytest.approx(float(bleu_score(["the cat sat on a mat"], [["the cat sat on the mat"]])))


def test_self_bleu_extremes_and_effective_order():
    assert self_bleu(["a b c", "a b c", "a b c"]) == pytest.approx([1.0, 1.0, 1.0])  # orders 1..3
    assert self_bleu(["a b", "c d"]) == [0.0, 0.0]
    assert self_bleu(["only one"]) == []
    metric = SelfBLEU()
    metric.update([["x y", "x y"], ["p q", "r s"], ["alone"]])
    assert float(metric.compute()) == pytest.approx(0.5)  # (1 + 1 + 0 + 0) / 4


def test_response_length_and_groups():
    metric = ResponseLength()
    metric.update([3, 5])
    metric.update([4])
    assert float(metric.compute()) == 4.0
    assert groups_of([1, 2, 3, 4], 2) == [[1, 2], [3, 4]]
    with pytest.raises(ValueError):
        groups_of([1, 2, 3], 2)
