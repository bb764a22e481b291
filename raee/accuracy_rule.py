"""Our exit rule: estimate each layer's chance of being right for this query from its neighbours' exit records, and
exit where that estimate, less a cost per layer run, is highest.

    a_l = (sum_j w_j v_jl + m * vbar_l) / (sum_j w_j + m),   w_j = exp((s_j - s_best) / T)
    U_l = a_l - cost * max(l, K) / L
    exit = argmax_l U_l (earliest on ties) if U_exit - U_L >= margin, else L (full depth)

v_jl is neighbour j's record at layer l: 1 where its layer-l prediction was right (`values="correct"`), or the
probability it was right with (`"confidence"`, RAEE's record); vbar_l is the store's average record, the prior the
estimate shrinks to when neighbours are few or far (strength m = `prior`). K is the prefix key's layer (0 for an
embedder key): those layers have run before the exit is chosen, so exiting below K saves nothing.

For the layers a prefix key has run (0..K), the query's own prediction there is known when the exit is chosen, so
its chance of being right can be read more directly (`key_layers="votes"`): the neighbours' weighted vote for that
label, the share of their weight whose gold label it is, shrunk to the store's label frequencies the same way:

    a_l = (sum_j w_j [y_j = yhat_l] + m * P(y = yhat_l)) / (sum_j w_j + m),   l <= K

(`"records"`, the default and the rule before: a_l from the records at every layer). Deeper layers have not run, so
their estimate stays the records'. Votes need a prefix key: with an embedder key nothing has run.

With cost = margin = 0 the rule exits at the layer the neighbours say is most often right. A margin above 0 keeps a
query at full depth unless its neighbours clearly favour an earlier layer (margin > 1: always full depth); a cost
above 0 trades estimated accuracy for depth. Build-time calibration (raee/calibration.py) walks this path from
cautious to aggressive: margin from 1 down to 0, then cost from 0 up. The RAEE rule itself is in raee/raee_rule.py.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Literal

import numpy as np

from raee.errors import InputError
from raee.raee_rule import MAX_K
from raee.records import layers_run

RecordValues = Literal["correct", "confidence"]
RECORD_VALUES: tuple[RecordValues, ...] = ("correct", "confidence")
KeyLayers = Literal["records", "votes"]
KEY_LAYERS: tuple[KeyLayers, ...] = ("records", "votes")


@dataclass(frozen=True)
class AccuracyRuleConfig:
    k: int = 64  # neighbours retrieved per query
    temperature: float = 0.05  # similarity scale of the weights exp((s_j - s_best) / T); smaller = closest dominate
    prior: float = 2.0  # pseudo-neighbours' worth of the store's average record mixed into every estimate
    values: RecordValues = "correct"  # a neighbour's record at a layer: right (1/0) or the probability when right
    margin: float = 0.0  # leave before full depth only if the exit's net estimate beats full depth's by this much
    cost: float = 0.0  # estimated accuracy traded per share of the layers run
    key_layers: KeyLayers = "records"  # layers 0..K the prefix key ran: estimated from the neighbours' records there,
    # or by their vote for the query's own prediction there ("votes", which needs those predictions: a prefix key)

    def __post_init__(self) -> None:
        if not (isinstance(self.k, int) and not isinstance(self.k, bool) and 1 <= self.k <= MAX_K):
            raise InputError(f"k must be an integer in 1..{MAX_K}, got {self.k!r}")
        if not self.temperature > 0:
            raise InputError(f"temperature must be positive, got {self.temperature!r}")
        if not self.prior >= 0:
            raise InputError(f"prior must be >= 0, got {self.prior!r}")
        if self.values not in RECORD_VALUES:
            raise InputError(f"values {self.values!r} is not one of {', '.join(RECORD_VALUES)}")
        if not self.margin >= 0:
            raise InputError(f"margin must be >= 0, got {self.margin!r}")
        if not self.cost >= 0:
            raise InputError(f"cost must be >= 0, got {self.cost!r}")
        if self.key_layers not in KEY_LAYERS:
            raise InputError(f"key_layers {self.key_layers!r} is not one of {', '.join(KEY_LAYERS)}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "AccuracyRuleConfig":
        unknown = set(values) - set(cls.__dataclass_fields__)
        if unknown:
            raise InputError(f"unknown accuracy-rule setting(s) {sorted(unknown)}; valid: "
                             f"{', '.join(cls.__dataclass_fields__)}")
        return cls(**values)


def similarity_weights(similarities: np.ndarray, valid: np.ndarray, temperature: float) -> np.ndarray:
    """(Q, k) exp((s_j - s_best) / T), 0 where no neighbour was found."""
    sims = similarities.astype(np.float64)
    best = np.where(valid, sims, -np.inf).max(axis=1, keepdims=True)
    best = np.where(np.isfinite(best), best, 0.0)
    return np.where(valid, np.exp(np.minimum((sims - best) / temperature, 0.0)), 0.0)


def weighted_records(similarities: np.ndarray, neighbour_ids: np.ndarray, record_values: np.ndarray, k: int,
                     temperature: float) -> tuple[np.ndarray, np.ndarray]:
    """(sum_j w_j v_jl (Q, L+1), sum_j w_j (Q, 1)) over each query's first k neighbours: the sums both the rule's
    estimate and the off-domain gate's agreement are made of."""
    similarities, neighbour_ids = similarities[:, :k], neighbour_ids[:, :k]
    valid = neighbour_ids >= 0
    weights = similarity_weights(similarities, valid, temperature)  # (Q, k)
    values = record_values[np.where(valid, neighbour_ids, 0)]  # (Q, k, L+1)
    return (values * weights[..., None]).sum(axis=1), weights.sum(axis=1, keepdims=True)


def estimated_accuracy(similarities: np.ndarray, neighbour_ids: np.ndarray, record_values: np.ndarray,
                       config: AccuracyRuleConfig, *, prior: bool = True,
                       store_mean: np.ndarray | None = None,
                       weighted: tuple[np.ndarray, np.ndarray] | None = None) -> np.ndarray:
    """(Q, L+1) a_l: the similarity-weighted mean of the neighbours' records, shrunk to the store's average.

    similarities, neighbour_ids: (Q, >=k), -1 = no neighbour; record_values: (N, L+1). prior=False gives the raw
    weighted share (what the off-domain gate reads as the neighbours' agreement). store_mean: record_values'
    mean over the items (L+1,), which the estimate shrinks to; pass it when serving, as computing it reads the
    whole store (0.2 ms per call on 8.7k items); or one mean per query (Q, L+1), as leave-one-out calibration passes
    each item's mean without it. weighted: weighted_records(...) for these neighbours, records,
    config.k and config.temperature, where the caller has them already."""
    total, mass = weighted if weighted is not None else weighted_records(
        similarities, neighbour_ids, record_values, config.k, config.temperature)
    if prior and config.prior > 0:
        mean = record_values.mean(axis=0) if store_mean is None else store_mean
        return (total + config.prior * mean) / (mass + config.prior)
    return total / np.maximum(mass, 1e-300)


def voted_accuracy(similarities: np.ndarray, neighbour_ids: np.ndarray, labels: np.ndarray, predicted: np.ndarray,
                   config: AccuracyRuleConfig, label_mean: np.ndarray | None = None) -> np.ndarray:
    """(Q, K+1) the neighbours' weighted vote for the query's own prediction at each layer the key ran, shrunk to
    the store's label frequencies (strength config.prior). labels: (N, C) one-hot gold labels of the store's items;
    predicted: (Q, K+1) the query's predicted label at layers 0..K; label_mean: labels' mean over the items (C,),
    passed when serving (as store_mean is), or per query (Q, C)."""
    total, mass = weighted_records(similarities, neighbour_ids, labels, config.k, config.temperature)  # (Q, C)
    if config.prior > 0:
        mean = labels.mean(axis=0) if label_mean is None else label_mean
        share = (total + config.prior * mean) / (mass + config.prior)
    else:
        share = total / np.maximum(mass, 1e-300)
    return np.take_along_axis(share, predicted.astype(np.int64), axis=1)


def rule_estimate(similarities: np.ndarray, neighbour_ids: np.ndarray, record_values: np.ndarray,
                  config: AccuracyRuleConfig, key_layer: int, *, store_mean: np.ndarray | None = None,
                  weighted: tuple[np.ndarray, np.ndarray] | None = None, labels: np.ndarray | None = None,
                  predicted: np.ndarray | None = None, label_mean: np.ndarray | None = None) -> np.ndarray:
    """(Q, L+1) the estimate the rule weighs against cost: the records' at every layer, and with key_layers=votes
    the votes at layers 0..K. store_mean, weighted: as for estimated_accuracy; labels, predicted, label_mean: as for
    voted_accuracy, required with votes (the queries' predictions at layers 0..K, which only a prefix key has)."""
    estimate = estimated_accuracy(similarities, neighbour_ids, record_values, config, store_mean=store_mean,
                                  weighted=weighted)
    if config.key_layers != "votes":
        return estimate
    if labels is None or predicted is None or predicted.shape != (len(estimate), key_layer + 1):
        raise InputError(f"key_layers=votes needs the query's predictions at layers 0..{key_layer}, which only a "
                         "prefix key runs before the exit is chosen")
    estimate = estimate.copy()
    estimate[:, :key_layer + 1] = voted_accuracy(similarities, neighbour_ids, labels, predicted, config, label_mean)
    return estimate


def layer_cost(num_layers: int, key_layer: int) -> np.ndarray:
    """(L+1,) share of the layers run when exiting at each layer: max(l, K) / L."""
    return layers_run(np.arange(num_layers + 1), key_layer) / num_layers


def exit_layers_from_estimate(estimate: np.ndarray, config: AccuracyRuleConfig, key_layer: int) -> np.ndarray:
    """(Q,) argmax_l of a_l - cost * max(l, K) / L, kept only where it beats full depth's by `margin`."""
    num_layers = estimate.shape[1] - 1
    net = estimate - config.cost * layer_cost(num_layers, key_layer)  # (Q, L+1)
    best = net.argmax(axis=1)
    gain = net[np.arange(len(net)), best] - net[:, num_layers]
    return np.where(gain >= config.margin - 1e-12, best, num_layers)


def accuracy_exit_layers(similarities: np.ndarray, neighbour_ids: np.ndarray, record_values: np.ndarray,
                         config: AccuracyRuleConfig, key_layer: int, store_mean: np.ndarray | None = None,
                         weighted: tuple[np.ndarray, np.ndarray] | None = None, *, labels: np.ndarray | None = None,
                         predicted: np.ndarray | None = None, label_mean: np.ndarray | None = None) -> np.ndarray:
    """The accuracy rule's exit layer (Q,) for each query from its neighbours; full depth where none was found.
    The other arguments: as for rule_estimate."""
    estimate = rule_estimate(similarities, neighbour_ids, record_values, config, key_layer, store_mean=store_mean,
                             weighted=weighted, labels=labels, predicted=predicted, label_mean=label_mean)
    exits = exit_layers_from_estimate(estimate, config, key_layer)
    found = (neighbour_ids[:, :config.k] >= 0).any(axis=1)
    return np.where(found, exits, record_values.shape[1] - 1)
