"""The off-domain gate: send a query to full depth when the store's evidence does not apply to it.

Three tests, each calibrated on the store's own items (each queried against the others, leave-one-out):
- far: the query's nearest neighbour is less similar than all but a share alpha/2 of calibration items' are;
- disagree: the neighbours' similarity-weighted share that was right at the chosen exit layer is lower than all
  but alpha/2 of calibration items' shares at their exits;
- shifted: the stream of queries as a whole looks unlike the calibration items. Each query's nearest similarity
  gets a conformal p-value against the calibration items' (uniform for in-domain queries), turned into an e-value
  kappa * p^(kappa - 1); a CUSUM of their logarithms crossing log(1 / stream_p) raises an alarm, and every query
  falls back while it lasts. In-domain, false alarms come about once per 1 / stream_p queries. This catches what
  the per-query tests cannot: queries from another domain whose nearest items are close enough one by one, but
  whose exit records describe a different task (a store of short opinion phrases asked about movie reviews).
In-domain, a query is flagged by a per-query test with probability about alpha (exchangeability). Flagged queries
exit at the fallback layer, full depth, where the store's evidence is not needed.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from functools import cached_property
from typing import Any, Literal

import numpy as np

from raee.errors import InputError

OffDomainReason = Literal["", "far", "disagree", "shifted"]
QUANTILE_POINTS = 1001  # the calibration similarities are kept as this many quantiles (0.1% resolution)


@dataclass(frozen=True)
class OffDomainGate:
    alpha: float  # in-domain share of queries the per-query tests flag (half each)
    min_similarity: float  # far: nearest-neighbour similarity below this
    min_agreement: float  # disagree: neighbours' weighted share right at the exit below this
    agreement_k: int  # neighbours the agreement reads
    agreement_temperature: float  # similarity scale of the agreement's weights
    similarity_quantiles: tuple[float, ...]  # calibration items' nearest similarities, QUANTILE_POINTS quantiles
    num_items: int  # calibration items behind the quantiles
    stream_p: float  # in-domain false-alarm rate of the stream test, per query; 0 = no stream test
    kappa: float = 0.5  # e-value calibrator exponent
    fallback_layer: int | None = None  # None = full depth

    def __post_init__(self) -> None:
        if not 0 <= self.alpha < 1:
            raise InputError(f"gate alpha must lie in [0, 1), got {self.alpha}")
        if not 0 <= self.stream_p < 1:
            raise InputError(f"gate stream_p must lie in [0, 1), got {self.stream_p}")
        if not 0 < self.kappa < 1:
            raise InputError(f"gate kappa must lie in (0, 1), got {self.kappa}")
        if len(self.similarity_quantiles) != QUANTILE_POINTS:
            raise InputError(f"gate needs {QUANTILE_POINTS} similarity quantiles, got {len(self.similarity_quantiles)}")

    @cached_property
    def quantile_grid(self) -> tuple[np.ndarray, np.ndarray]:
        """(similarity_quantiles as an array, the share of calibration items at each), made once: building them
        from the 1001-value tuple on every served batch cost about 0.1 ms."""
        return np.asarray(self.similarity_quantiles), np.linspace(0, 1, QUANTILE_POINTS)

    @property
    def stream_threshold(self) -> float:
        return math.log(1 / self.stream_p) if self.stream_p > 0 else math.inf

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "similarity_quantiles": list(self.similarity_quantiles)}

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "OffDomainGate":
        return cls(**{**values, "similarity_quantiles": tuple(values["similarity_quantiles"])})


def fit_similarity(nearest_similarity: np.ndarray, alpha: float) -> tuple[float, tuple[float, ...]]:
    """(far threshold, quantiles) from calibration items' leave-one-out nearest similarities (N,)."""
    quantiles = np.quantile(nearest_similarity, np.linspace(0, 1, QUANTILE_POINTS))
    threshold = float(np.quantile(nearest_similarity, alpha / 2)) if alpha > 0 else -math.inf
    return threshold, tuple(float(q) for q in quantiles)


def agreement_threshold(agreement: np.ndarray, alpha: float) -> float:
    """The disagree threshold: the alpha/2 quantile of calibration items' agreement at their exits."""
    return float(np.quantile(agreement, alpha / 2)) if alpha > 0 else -math.inf


def conformal_pvalues(gate: OffDomainGate, nearest_similarity: np.ndarray) -> np.ndarray:
    """(Q,) share of calibration items whose nearest similarity is at most the query's (from the stored quantiles),
    floored at 1 / (N + 1): small when the query is farther from the store than calibration items were."""
    quantiles, shares = gate.quantile_grid
    share = np.interp(nearest_similarity, quantiles, shares, left=0.0, right=1.0)
    return np.maximum(share, 1.0 / (gate.num_items + 1))


def cusum_alarms(pvalues: np.ndarray, start: float, gate: OffDomainGate) -> tuple[np.ndarray, float]:
    """(alarms (Q,), CUSUM after the last query): S_t = max(0, S_{t-1} + log(kappa * p_t^(kappa - 1))), alarm where
    S_t reaches log(1 / stream_p). Queries are taken in order; the state carries over between calls."""
    log_e = math.log(gate.kappa) + (gate.kappa - 1) * np.log(pvalues)
    alarms = np.zeros(len(pvalues), dtype=bool)
    state = start
    for i, step in enumerate(log_e):
        state = max(0.0, state + float(step))
        alarms[i] = state >= gate.stream_threshold
    return alarms, state


def off_domain_reasons(gate: OffDomainGate, nearest_similarity: np.ndarray, agreement: np.ndarray,
                       alarms: np.ndarray) -> np.ndarray:
    """(Q,) "" for in-domain queries, else the first test that flagged them: far, disagree, shifted."""
    return np.where(nearest_similarity < gate.min_similarity, "far",
                    np.where(agreement < gate.min_agreement, "disagree", np.where(alarms, "shifted", "")))


class StreamMonitor:
    """The stream test's state for one store: feed it each batch's p-values in arrival order."""

    def __init__(self, gate: OffDomainGate) -> None:
        self.gate, self.state = gate, 0.0

    def update(self, pvalues: np.ndarray) -> np.ndarray:
        alarms, self.state = cusum_alarms(pvalues, self.state, self.gate)
        return alarms
