"""Exit policies compared side by side, as pure functions of per-layer arrays.

Every policy maps a test item's per-layer head outputs (and, for RAEE, its neighbours in the exit store) to an
exit layer. Policies that learn (AdaInfer's SVM, calibrated confidence thresholds) learn only from the exit store's
calibration records, never from test data. `oracle` reads the gold label: an upper bound, not a usable policy.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

from raee.errors import InputError
from raee.policy import RaeeConfig, exit_layers_from_scores, layer_scores
from raee.records import ExitRecords, softmax

POLICY_FORMS = ("full", "static:L", "oracle", "raee", "raee-no-tau", "raee-k:K", "raee-earliest:A", "adainfer",
                "confidence[:RATE]")


@dataclass(frozen=True)
class QueryView:
    """What policies may look at for Q test items."""

    label_logits: np.ndarray  # (Q, L+1, C) head outputs at every layer
    similarities: np.ndarray  # (Q, kmax) to the store's neighbours
    neighbour_ids: np.ndarray  # (Q, kmax), -1 = none
    gold: np.ndarray | None = None  # (Q,), only the oracle reads it

    @property
    def num_layers(self) -> int:
        return self.label_logits.shape[1] - 1


def head_features(label_logits: np.ndarray) -> np.ndarray:
    """(..., L+1, 2): AdaInfer's per-layer features, gap (top-1 minus top-2 probability) and top probability."""
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
    features = head_features(records.label_logits)[:, :-1].reshape(-1, 2)
    return LinearSVM().fit(features, records.correct[:, :-1].reshape(-1))


def calibrate_confidence(records: ExitRecords, target: float = 0.95, holdout: float = 0.3,
                         seed: int = 0) -> np.ndarray:
    """Per-layer max-probability thresholds (L+1,), chosen on a held-out part of the calibration items: at each layer
    the lowest threshold whose exits agree with the full-depth prediction at least `target` of the time (inf where no
    threshold does). The last layer's threshold is 0."""
    rows = np.random.default_rng(seed).permutation(records.num_items)[:max(1, int(records.num_items * holdout))]
    probs = softmax(records.label_logits[rows])
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


@dataclass(frozen=True)
class PolicySpec:
    """A parsed policy name."""

    name: str
    kind: str  # fixed | oracle | raee | adainfer | confidence
    layer: int | None = None
    raee: RaeeConfig | None = None
    rate: float | None = None


def parse(name: str, num_layers: int, store_config: RaeeConfig) -> PolicySpec:
    head, _, arg = name.partition(":")
    try:
        if name == "full":
            return PolicySpec(name, "fixed", layer=num_layers)
        if head == "static" and arg.isdigit() and int(arg) <= num_layers:
            return PolicySpec(name, "fixed", layer=int(arg))
        if name == "oracle":
            return PolicySpec(name, "oracle")
        if name == "raee":
            return PolicySpec(name, "raee", raee=store_config)
        if name == "raee-no-tau":
            return PolicySpec(name, "raee", raee=dataclasses.replace(store_config, use_tau=False))
        if head == "raee-k" and arg.isdigit():
            return PolicySpec(name, "raee", raee=dataclasses.replace(store_config, k=int(arg)))
        if head == "raee-earliest" and arg:
            return PolicySpec(name, "raee", raee=dataclasses.replace(store_config, earliest_ratio=float(arg)))
        if name == "adainfer":
            return PolicySpec(name, "adainfer")
        if head == "confidence" and (not arg or 0 < float(arg) <= 1):
            return PolicySpec(name, "confidence", rate=float(arg) if arg else 0.95)
    except ValueError:
        pass
    raise InputError(f"policy {name!r} is not one of {', '.join(POLICY_FORMS)} (L in 0..{num_layers})")


class PolicySuite:
    """Exit decisions of many policies over one store; learned parts are fitted once, on the store's records."""

    def __init__(self, records: ExitRecords, store_config: RaeeConfig) -> None:
        self.records, self.store_config = records, store_config
        self.record_probability = records.record_probability()
        self._adainfer: LinearSVM | None = None
        self._thresholds: dict[float, np.ndarray] = {}

    def spec(self, name: str) -> PolicySpec:
        return parse(name, self.records.num_layers, self.store_config)

    def adainfer(self) -> LinearSVM:
        if self._adainfer is None:
            self._adainfer = fit_adainfer(self.records)
        return self._adainfer

    def thresholds(self, rate: float) -> np.ndarray:
        if rate not in self._thresholds:
            self._thresholds[rate] = calibrate_confidence(self.records, rate)
        return self._thresholds[rate]

    def stops(self, spec: PolicySpec, label_logits: np.ndarray) -> np.ndarray:
        """(Q, L+1) per-layer stop decisions of the head-reading policies (adainfer, confidence)."""
        if spec.kind == "adainfer":
            features = head_features(label_logits)
            return self.adainfer().decide(features.reshape(-1, 2)).reshape(features.shape[:2])
        if spec.kind == "confidence":
            return softmax(label_logits).max(axis=-1) >= self.thresholds(spec.rate)
        raise InputError(f"{spec.name} does not decide layer by layer")

    def exit_layers(self, spec: PolicySpec, view: QueryView) -> np.ndarray:
        q, num_layers = view.label_logits.shape[0], view.num_layers
        if spec.kind == "fixed":
            return np.full(q, spec.layer)
        if spec.kind == "oracle":
            if view.gold is None:
                raise InputError("the oracle needs gold labels")
            correct = view.label_logits.argmax(axis=-1) == view.gold[:, None]
            return np.where(correct.any(axis=1), correct.argmax(axis=1), num_layers)
        if spec.kind == "raee":
            k = min(spec.raee.k, view.neighbour_ids.shape[1])  # a store smaller than k: every item is a neighbour
            scores = layer_scores(view.similarities[:, :k], view.neighbour_ids[:, :k], self.record_probability,
                                  spec.raee)
            return exit_layers_from_scores(scores, spec.raee.earliest_ratio)
        return first_stop(self.stops(spec, view.label_logits))
