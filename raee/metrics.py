"""Task metrics: accuracy, and Matthews correlation (CoLA) in its multi-class form."""

from __future__ import annotations

import numpy as np

from raee.errors import InputError


def accuracy(predicted: np.ndarray, gold: np.ndarray) -> float:
    return float(np.mean(predicted == gold)) if len(gold) else 0.0


def matthews_correlation(predicted: np.ndarray, gold: np.ndarray) -> float:
    """Gorodkin's multi-class MCC; equals the usual binary MCC for two labels. 0 when undefined."""
    labels = np.union1d(predicted, gold)
    confusion = np.zeros((len(labels), len(labels)))
    np.add.at(confusion, (np.searchsorted(labels, gold), np.searchsorted(labels, predicted)), 1)
    t, p = confusion.sum(axis=1), confusion.sum(axis=0)
    c, s = np.trace(confusion), confusion.sum()
    denominator = np.sqrt((s ** 2 - p @ p) * (s ** 2 - t @ t))
    return float((c * s - t @ p) / denominator) if denominator > 0 else 0.0


def task_score(metric: str, predicted: np.ndarray, gold: np.ndarray) -> float:
    if metric == "accuracy":
        return accuracy(predicted, gold)
    if metric == "mcc":
        return matthews_correlation(predicted, gold)
    raise InputError(f"metric {metric!r} is not accuracy or mcc")
