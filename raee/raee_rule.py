"""The RAEE rule (faithful to the paper and its reference code), as a pure function of retrieved neighbours.

Per query: weight neighbour j by closeness, keep each neighbour's exit records with probability >= tau (else its
top `fallback_top` records), add p x w to each layer's score, exit at the argmax (ties to the earliest layer), and
run full depth when no neighbour contributes. ../shared/RAEE.md has the method; raee/accuracy_rule.py holds our
alternative rule and raee/baselines.py the non-retrieval policies we compare against.

Closeness weights: the reference code divides FAISS L2 distances, which are *squared* distances: w_j = d2_min / d2_j.
Our keys are unit vectors searched by inner product s, and for unit vectors d2 = 2 - 2s exactly, so the faithful
weight is w_j = (1 - s_best) / (1 - s_j). A tiny epsilon keeps an exact duplicate (d2 = 0) finite: it then weighs
~1 against ~1e-6 for every other neighbour, as in the reference. `weights="unsquared"` (w = d_min / d_j, the square
root of the faithful weight) is our earlier variant, kept as a named ablation.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Literal

import numpy as np

from raee.errors import InputError

DISTANCE_EPSILON = 1e-6
MAX_K = 1024  # the most neighbours any retrieval policy may ask for
Weights = Literal["squared", "unsquared"]
WEIGHTS: tuple[Weights, ...] = ("squared", "unsquared")


@dataclass(frozen=True)
class RaeeConfig:
    k: int = 12  # neighbours retrieved per query
    tau: float = 0.9  # a neighbour's records count only where its probability reaches tau ...
    fallback_top: int = 3  # ... else its top-`fallback_top` records by probability count
    use_tau: bool = True  # False: every correct record counts (ablation)
    earliest_ratio: float = 1.0  # exit at the earliest layer whose score reaches this share of the best; 1 = RAEE
    weights: Weights = "squared"  # closeness weights over squared L2 distances (the reference's) or unsquared ones

    def __post_init__(self) -> None:
        if not (isinstance(self.k, int) and not isinstance(self.k, bool) and 1 <= self.k <= MAX_K):
            raise InputError(f"k must be an integer in 1..{MAX_K}, got {self.k!r}")
        if not 0.0 <= self.tau <= 1.0:
            raise InputError(f"tau must lie in [0, 1], got {self.tau!r}")
        if not (isinstance(self.fallback_top, int) and self.fallback_top >= 1):
            raise InputError(f"fallback_top must be a positive integer, got {self.fallback_top!r}")
        if not 0.0 < self.earliest_ratio <= 1.0:
            raise InputError(f"earliest_ratio must lie in (0, 1], got {self.earliest_ratio!r}")
        if self.weights not in WEIGHTS:
            raise InputError(f"weights {self.weights!r} is not one of {', '.join(WEIGHTS)}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "RaeeConfig":
        """Rebuild from a manifest (stores written before `weights` existed get the faithful squared weights)."""
        unknown = set(values) - set(cls.__dataclass_fields__)
        if unknown:
            raise InputError(f"unknown RAEE setting(s) {sorted(unknown)}; valid: {', '.join(cls.__dataclass_fields__)}")
        return cls(**values)


def closeness_weights(similarities: np.ndarray, valid: np.ndarray, weights: Weights = "squared") -> np.ndarray:
    """(Q, k) weights d2_min / d2_j (or d_min / d_j) from inner-product similarities of unit vectors; 0 where not
    valid."""
    squared = np.clip(2.0 - 2.0 * similarities.astype(np.float64), 0.0, None)
    distances = (squared if weights == "squared" else np.sqrt(squared)) + DISTANCE_EPSILON
    d_min = np.where(valid, distances, np.inf).min(axis=1, keepdims=True)
    return np.where(valid, d_min / distances, 0.0)


def layer_scores(similarities: np.ndarray, neighbour_ids: np.ndarray, record_probability: np.ndarray,
                 config: RaeeConfig) -> np.ndarray:
    """S (Q, L+1): per layer, the closeness-weighted probabilities of the neighbours' kept exit records.

    similarities, neighbour_ids: (Q, k) from the index (id -1 = no neighbour found); only the first config.k
    columns are read. record_probability: (N, L+1), p_l where item's layer l is right, else 0.
    """
    similarities, neighbour_ids = similarities[:, :config.k], neighbour_ids[:, :config.k]
    valid = neighbour_ids >= 0
    weights = closeness_weights(similarities, valid, config.weights)  # (Q, k)
    records = record_probability[np.where(valid, neighbour_ids, 0)] * valid[..., None]  # (Q, k, L+1)
    kept = records > 0
    if config.use_tau:
        confident = records >= config.tau
        top = np.argsort(-records, axis=-1, kind="stable")[..., :config.fallback_top]
        fallback = np.zeros_like(kept)
        np.put_along_axis(fallback, top, True, axis=-1)
        fallback &= kept
        kept = np.where(confident.any(axis=-1, keepdims=True), confident, fallback)
    return (records * kept * weights[..., None]).sum(axis=1)


def exit_layers_from_scores(scores: np.ndarray, earliest_ratio: float = 1.0) -> np.ndarray:
    """(Q,) the earliest layer whose score reaches earliest_ratio * max(S) -- with ratio 1, RAEE's argmax with ties
    to the earliest layer; full depth where no neighbour contributed."""
    num_layers = scores.shape[1] - 1
    best = scores.max(axis=1, keepdims=True)
    reaches = scores >= earliest_ratio * best * (1 - 1e-9)  # relative slack: float sums in another order tie too
    return np.where(best[:, 0] > 0, reaches.argmax(axis=1), num_layers)


def raee_exit_layers(similarities: np.ndarray, neighbour_ids: np.ndarray, record_probability: np.ndarray,
                     config: RaeeConfig) -> np.ndarray:
    """RAEE's exit layer (Q,) for each query from its neighbours."""
    scores = layer_scores(similarities, neighbour_ids, record_probability, config)
    return exit_layers_from_scores(scores, config.earliest_ratio)
