"""The RAEE exit policy as a pure function of retrieved neighbours and their exit records.

Closeness weights: the reference code weights neighbour j by d_min / d_j over L2 distances. Our keys are unit
vectors searched by inner product s, and for unit vectors d = sqrt(2 - 2s) exactly, so we compute that distance
and use the reference formula unchanged (with a tiny epsilon so an exact duplicate, d = 0, keeps a finite weight).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from raee.errors import InputError

DISTANCE_EPSILON = 1e-6


@dataclass(frozen=True)
class RaeeConfig:
    k: int = 12  # neighbours retrieved per query
    tau: float = 0.9  # a neighbour's records count only where its probability reaches tau ...
    fallback_top: int = 3  # ... else its top-`fallback_top` records by probability count
    use_tau: bool = True  # False: every correct record counts (ablation)
    earliest_ratio: float = 1.0  # exit at the earliest layer whose score reaches this share of the best; 1 = RAEE

    def __post_init__(self) -> None:
        if not (isinstance(self.k, int) and 1 <= self.k <= 1024):
            raise InputError(f"k must be an integer in 1..1024, got {self.k!r}")
        if not 0.0 <= self.tau <= 1.0:
            raise InputError(f"tau must lie in [0, 1], got {self.tau!r}")
        if not (isinstance(self.fallback_top, int) and self.fallback_top >= 1):
            raise InputError(f"fallback_top must be a positive integer, got {self.fallback_top!r}")
        if not 0.0 < self.earliest_ratio <= 1.0:
            raise InputError(f"earliest_ratio must lie in (0, 1], got {self.earliest_ratio!r}")

    def to_dict(self) -> dict:
        return asdict(self)


def closeness_weights(similarities: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """(Q, k) weights d_min / d_j from inner-product similarities of unit vectors; 0 where not valid."""
    distances = np.sqrt(np.clip(2.0 - 2.0 * similarities, 0.0, None)) + DISTANCE_EPSILON
    d_min = np.where(valid, distances, np.inf).min(axis=1, keepdims=True)
    return np.where(valid, d_min / distances, 0.0)


def layer_scores(similarities: np.ndarray, neighbour_ids: np.ndarray, record_probability: np.ndarray,
                 config: RaeeConfig) -> np.ndarray:
    """S (Q, L+1): per layer, the closeness-weighted probabilities of the neighbours' kept exit records.

    similarities, neighbour_ids: (Q, k) from the index (id -1 = no neighbour found).
    record_probability: (N, L+1), p_l where item's layer l is right, else 0.
    """
    valid = neighbour_ids >= 0
    weights = closeness_weights(similarities, valid)  # (Q, k)
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
