"""Matthews correlation (CoLA's metric) against references computed the slow obvious way."""

from __future__ import annotations

import math

import numpy as np
import pytest

from raee.metrics import matthews_correlation, task_score


def binary_mcc(predicted: list[int], gold: list[int]) -> float:
    """(TP TN - FP FN) / sqrt((TP+FP)(TP+FN)(TN+FP)(TN+FN)), counted one item at a time; 0 when undefined."""
    tp = tn = fp = fn = 0
    for p, g in zip(predicted, gold):
        tp += p == 1 and g == 1
        tn += p == 0 and g == 0
        fp += p == 1 and g == 0
        fn += p == 0 and g == 1
    denominator = math.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
    return (tp * tn - fp * fn) / denominator if denominator else 0.0


def pearson_of_one_hots(predicted: list[int], gold: list[int], labels: int) -> float:
    """Multi-class MCC as Gorodkin defines it: the correlation of the one-hot prediction and gold matrices,
    cov(X, Y) / sqrt(cov(X, X) cov(Y, Y)), with covariances summed over the labels; 0 when undefined."""
    n = len(gold)
    x = [[1.0 if p == k else 0.0 for k in range(labels)] for p in predicted]
    y = [[1.0 if g == k else 0.0 for k in range(labels)] for g in gold]

    def cov(a: list[list[float]], b: list[list[float]]) -> float:
        total = 0.0
        for k in range(labels):
            mean_a, mean_b = sum(r[k] for r in a) / n, sum(r[k] for r in b) / n
            total += sum((a[i][k] - mean_a) * (b[i][k] - mean_b) for i in range(n))
        return total
    denominator = math.sqrt(cov(x, x) * cov(y, y))
    return cov(x, y) / denominator if denominator else 0.0


@pytest.mark.parametrize("seed", range(20))
def test_binary_mcc_matches_the_confusion_matrix_formula(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(2, 60))
    gold = rng.integers(0, 2, n)
    predicted = np.where(rng.random(n) < rng.random(), gold, 1 - gold)  # agreeing with gold at a random rate
    expected = binary_mcc(predicted.tolist(), gold.tolist())
    assert matthews_correlation(predicted, gold) == pytest.approx(expected, abs=1e-12)
    assert task_score("mcc", predicted, gold) == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("seed", range(20))
def test_multiclass_mcc_matches_the_correlation_of_one_hots(seed):
    rng = np.random.default_rng(100 + seed)
    labels, n = int(rng.integers(2, 6)), int(rng.integers(2, 50))
    gold = rng.integers(0, labels, n)
    predicted = np.where(rng.random(n) < 0.6, gold, rng.integers(0, labels, n))
    expected = pearson_of_one_hots(predicted.tolist(), gold.tolist(), labels)
    assert matthews_correlation(predicted, gold) == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("predicted, gold, expected", [
    ([0, 1, 0, 1], [0, 1, 0, 1], 1.0),  # all right
    ([1, 0, 1, 0], [0, 1, 0, 1], -1.0),  # all wrong
    ([1, 1, 1, 1], [0, 1, 0, 1], 0.0),  # one label predicted throughout: undefined, 0 as CoLA reports it
])
def test_mcc_at_the_extremes(predicted, gold, expected):
    assert matthews_correlation(np.array(predicted), np.array(gold)) == expected
