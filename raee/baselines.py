"""The policies RAEE is compared against, as pure functions of per-layer head outputs: the oracle (an upper bound
that reads the gold label), AdaInfer and calibrated confidence. Full depth and static exits need no function.

Policies that learn (AdaInfer's SVM, the confidence thresholds) learn only from the exit store's calibration
records, never from test data. The RAEE rule is in raee/raee_rule.py, ours in raee/accuracy_rule.py.

AdaInfer's two features per layer are the gap (top-1 minus top-2 probability) and the top probability of the head's
distribution. AdaInfer reads the full next-token (vocabulary) distribution; language-model records carry its top two
probabilities (`vocab_top2`) and those are used when present. Sentence encoders have no vocabulary, and there the
features come from the softmax over the label words only, where, on a binary task, gap = 2 * top - 1: the two
features collapse into one. Labelling follows AdaInfer: a layer is a "stop" example when its prediction is right.
That assumes a right answer at a layer means stopping there is good, which holds for a single-label classifier
(later layers can only change a right answer, never improve it) but says nothing about how confident it was.
"""

from __future__ import annotations

import numpy as np

from raee.records import ExitRecords, earliest_correct_layers, softmax

DEFAULT_AGREEMENT = 0.95  # calibrated confidence: exits agree with full depth at least this often on calibration


def oracle_exit_layers(label_logits: np.ndarray, gold: np.ndarray) -> np.ndarray:
    """(Q,) the earliest layer whose prediction is right, else full depth. Reads the gold label: an upper bound."""
    return earliest_correct_layers(label_logits, gold, missing=label_logits.shape[1] - 1)


def head_features(label_logits: np.ndarray, vocab_top2: np.ndarray | None = None) -> np.ndarray:
    """(..., L+1, 2): AdaInfer's per-layer features, gap (top-1 minus top-2 probability) and top probability; from
    the full vocabulary's top two when given, else from the softmax over the label words."""
    if vocab_top2 is not None:
        return np.stack([vocab_top2[..., 0] - vocab_top2[..., 1], vocab_top2[..., 0]], axis=-1)
    probs = np.sort(softmax(label_logits), axis=-1)
    return np.stack([probs[..., -1] - probs[..., -2], probs[..., -1]], axis=-1)


def first_stop(stop: np.ndarray) -> np.ndarray:
    """(Q,) first layer where stop (Q, L+1) is True; the last layer always stops."""
    stop = stop.copy()
    stop[:, -1] = True
    return stop.argmax(axis=1)


class LinearSVM:
    """A linear soft-margin SVM (hinge loss, L2), class-balanced, fitted by full-batch subgradient descent on
    standardised features. Small and dependency-free: AdaInfer's classifier has two features."""

    def __init__(self, c: float = 10.0, epochs: int = 500, learning_rate: float = 0.5) -> None:
        self.c, self.epochs, self.learning_rate = c, epochs, learning_rate

    def fit(self, x: np.ndarray, y: np.ndarray) -> "LinearSVM":
        """x: (N, F) features; y: (N,) bool, True = stop."""
        self.mean, self.std = x.mean(axis=0), x.std(axis=0) + 1e-9
        z = (x - self.mean) / self.std
        sign = np.where(y, 1.0, -1.0)
        positives = max(int(y.sum()), 1)
        weight = np.where(y, len(y) / (2 * positives), len(y) / (2 * max(len(y) - positives, 1)))
        self.w, self.b = np.zeros(x.shape[1]), 0.0
        for epoch in range(self.epochs):
            margin = sign * (z @ self.w + self.b)
            active = (margin < 1) * weight * sign  # subgradient of the hinge where the margin is violated
            grad_w = self.w / self.c - (active @ z) / len(y)
            grad_b = -active.mean()
            step = self.learning_rate / (1 + 0.05 * epoch)
            self.w, self.b = self.w - step * grad_w, self.b - step * grad_b
        return self

    def decide(self, x: np.ndarray) -> np.ndarray:
        return ((x - self.mean) / self.std) @ self.w + self.b > 0


def fit_adainfer(records: ExitRecords) -> LinearSVM:
    """Train the stop classifier on calibration records: features at every layer but the last, label = that layer's
    prediction is right (AdaInfer's labelling)."""
    features = head_features(records.label_logits, records.vocab_top2)[:, :-1].reshape(-1, 2)
    return LinearSVM().fit(features, records.correct[:, :-1].reshape(-1))


def adainfer_exit_layers(svm: LinearSVM, label_logits: np.ndarray, vocab_top2: np.ndarray | None) -> np.ndarray:
    """(Q,) the first layer the SVM says to stop at."""
    features = head_features(label_logits, vocab_top2)
    return first_stop(svm.decide(features.reshape(-1, 2)).reshape(features.shape[:2]))


def calibrate_confidence(records: ExitRecords, target: float = DEFAULT_AGREEMENT) -> np.ndarray:
    """Per-layer max-probability thresholds (L+1,), chosen on every calibration item: at each layer the lowest
    threshold whose exits agree with the full-depth prediction at least `target` of the time among the items it lets
    leave (inf where no threshold does). The last layer's threshold is 0."""
    probs = softmax(records.label_logits)
    confidence, predicted = probs.max(axis=-1), probs.argmax(axis=-1)
    agrees = predicted == predicted[:, -1:]
    thresholds = np.full(records.num_layers + 1, np.inf)
    thresholds[-1] = 0.0
    for layer in range(records.num_layers):
        order = np.argsort(-confidence[:, layer], kind="stable")
        rate = np.cumsum(agrees[order, layer]) / np.arange(1, len(order) + 1)  # agreement of the top-n confident
        ok = np.flatnonzero(rate >= target)
        if len(ok):
            thresholds[layer] = confidence[order[ok[-1]], layer]
    return thresholds


def confidence_exit_layers(thresholds: np.ndarray, label_logits: np.ndarray) -> np.ndarray:
    """(Q,) the first layer whose top label probability reaches its threshold."""
    return first_stop(softmax(label_logits).max(axis=-1) >= thresholds)
