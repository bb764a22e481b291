"""The statistics behind `match-full`'s guarantee: an exact test that a policy's accuracy is no more than epsilon
below full depth's, and fixed-sequence testing over a path of settings (Learn then Test).

Per calibration item, loss = [full depth is right] - [the policy's exit is right], in {-1, 0, 1}; the risk is its
mean, E[loss] = p_harm - p_help. We test H0: risk > epsilon for each setting on the path, from cautious to
aggressive, each at level delta, and stop at the first setting H0 cannot be rejected for (fixed-sequence testing:
the chance that any accepted setting has risk above epsilon is at most delta). The served setting is the last one
accepted. This assumes calibration items and queries are exchangeable (drawn from one distribution).

The test is exact. Given the number of discordant items D = harms + helps, harms ~ Binomial(D, q) with
q = p_harm / (p_harm + p_help); on the boundary of H0, q = (1 + epsilon / nu) / 2 where nu = P(discordant). nu is a
nuisance parameter: Berger and Boos (1994) take the worst case over a 1 - gamma Clopper-Pearson interval for nu and
add gamma to the p-value. That keeps the test exact while its width follows the number of discordant items, as a
normal approximation would, instead of the whole [-1, 1] range that Hoeffding's bound pays for.

The risk above is an expectation. Anyone who checks the guarantee measures it on a file of m queries, whose own
risk scatters around the expectation by about sqrt(nu / m): on m = 2000 queries and nu = 0.2, one point, twice
epsilon. So `file_risk_pvalue` also tests H0: "the risk measured on m future queries exceeds epsilon", from the
calibration mean and the scatter of both samples (a normal approximation, not exact), and a setting is accepted
only when both nulls are rejected (an intersection-union test: the larger p-value is a valid p-value for the union).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from statistics import NormalDist

import numpy as np

from raee.errors import InputError

GAMMA_SHARE = 0.1  # share of delta spent on the interval for the discordance rate (Berger-Boos)
_BISECTIONS = 45


_LOG_FACTORIALS = np.zeros(1)


def _log_factorials(n: int) -> np.ndarray:
    """log(i!) for i in 0..>=n, grown as needed and kept."""
    global _LOG_FACTORIALS
    if len(_LOG_FACTORIALS) <= n:
        size = max(n + 1, 2 * len(_LOG_FACTORIALS))
        _LOG_FACTORIALS = np.concatenate([[0.0], np.cumsum(np.log(np.arange(1, size, dtype=np.float64)))])
    return _LOG_FACTORIALS


def binomial_cdf(x: int, n: int, p: float) -> float:
    """P(X <= x) for X ~ Binomial(n, p), summed exactly in log space."""
    if x < 0:
        return 0.0
    if x >= n or p <= 0.0:
        return 1.0
    if p >= 1.0:
        return 0.0
    log_fact = _log_factorials(n)
    k = np.arange(x + 1)
    log_pmf = log_fact[n] - log_fact[k] - log_fact[n - k] + k * math.log(p) + (n - k) * math.log1p(-p)
    top = log_pmf.max()
    return float(min(1.0, math.exp(top) * np.exp(log_pmf - top).sum()))


def clopper_pearson_upper(x: int, n: int, alpha: float) -> float:
    """The exact one-sided 1 - alpha upper confidence bound for a binomial rate, x successes in n."""
    if x >= n:
        return 1.0
    low, high = x / n, 1.0
    for _ in range(_BISECTIONS):
        middle = (low + high) / 2
        if binomial_cdf(x, n, middle) > alpha:
            low = middle
        else:
            high = middle
    return high


def clopper_pearson_lower(x: int, n: int, alpha: float) -> float:
    """The exact one-sided 1 - alpha lower confidence bound for a binomial rate."""
    return 0.0 if x <= 0 else 1.0 - clopper_pearson_upper(n - x, n, alpha)


@dataclass(frozen=True)
class PairedRiskTest:
    """The exact test of H0: p_harm - p_help >= epsilon from `harms` and `helps` among n paired items, with gamma
    spent on a two-sided Clopper-Pearson interval [nu_low, nu_high] for the discordance rate (Berger-Boos)."""

    harms: int
    helps: int
    n: int
    gamma: float
    nu_low: float
    nu_high: float

    @classmethod
    def of(cls, harms: int, helps: int, n: int, gamma: float) -> "PairedRiskTest":
        if not (0 <= harms and 0 <= helps and harms + helps <= n and n >= 1):
            raise InputError(f"need 0 <= harms + helps <= n, got {harms} + {helps} of {n}")
        if not 0 < gamma < 1:
            raise InputError(f"gamma must lie in (0, 1), got {gamma}")
        discordant = harms + helps
        return cls(harms, helps, n, gamma, clopper_pearson_lower(discordant, n, gamma / 2),
                   clopper_pearson_upper(discordant, n, gamma / 2))

    def pvalue(self, epsilon: float) -> float:
        """p-value of H0: risk >= epsilon."""
        if not -1.0 < epsilon < 1.0:
            raise InputError(f"epsilon must lie in (-1, 1), got {epsilon}")
        if epsilon > 0:
            # H0 needs nu >= epsilon; the boundary q falls as nu grows, so the worst case is the largest nu.
            if self.nu_high < epsilon:
                return min(1.0, self.gamma)
            q = (1 + epsilon / self.nu_high) / 2
        else:
            # any nu at or below -epsilon allows every q under H0, q = 0 included: nothing can be rejected.
            if self.nu_low <= -epsilon:
                return 1.0
            q = (1 + epsilon / self.nu_low) / 2
        return min(1.0, binomial_cdf(self.harms, self.harms + self.helps, q) + self.gamma)

    def upper_bound(self, delta: float) -> float:
        """The smallest epsilon whose H0 is rejected at level delta: a 1 - delta upper confidence bound on the
        risk (reported as evidence)."""
        low, high = -1.0 + 1e-9, 1.0 - 1e-9
        if self.pvalue(high) > delta:
            return 1.0
        for _ in range(_BISECTIONS):
            middle = (low + high) / 2
            if self.pvalue(middle) <= delta:
                high = middle
            else:
                low = middle
        return high


def risk_pvalue(harms: int, helps: int, n: int, epsilon: float, gamma: float) -> float:
    """p-value of H0: p_harm - p_help >= epsilon (see PairedRiskTest)."""
    return PairedRiskTest.of(harms, helps, n, gamma).pvalue(epsilon)


def risk_upper_bound(harms: int, helps: int, n: int, delta: float, gamma: float) -> float:
    """1 - delta upper confidence bound on p_harm - p_help (see PairedRiskTest)."""
    return PairedRiskTest.of(harms, helps, n, gamma).upper_bound(delta)


def file_risk_pvalue(harms: int, helps: int, n: int, epsilon: float, query_items: int) -> float:
    """Approximate p-value of H0: the risk measured on a file of query_items future queries, exchangeable with the n
    calibration items, exceeds epsilon; 0 for query_items = 0 (no file-level claim). The file's risk minus the
    calibration mean has mean 0 and variance at most nu (1/n + 1/m), where nu, the rate of discordant items, bounds
    each loss's variance; nu is estimated as (discordant + 1) / (n + 1), so that a setting no item disagrees with
    still has some scatter. A normal approximation: close for the hundreds of discordant items of real stores, and
    not exact in the far tail of a few."""
    if query_items == 0:
        return 0.0
    scatter = _file_scatter(harms, helps, n, query_items)
    return 1.0 - NormalDist().cdf((epsilon - (harms - helps) / n) / scatter)


def file_risk_bound(harms: int, helps: int, n: int, delta: float, query_items: int) -> float:
    """The smallest epsilon file_risk_pvalue rejects at level delta: an approximate 1 - delta upper bound on the
    risk a file of query_items queries will measure (reported as evidence)."""
    if not 0 < delta < 1:
        raise InputError(f"delta must lie in (0, 1), got {delta}")
    if query_items == 0:
        return -1.0
    return (harms - helps) / n + NormalDist().inv_cdf(1 - delta) * _file_scatter(harms, helps, n, query_items)


def _file_scatter(harms: int, helps: int, n: int, query_items: int) -> float:
    """sqrt(nu (1/n + 1/m)): the scatter of a file's risk around the calibration mean (file_risk_pvalue)."""
    if query_items < 1:
        raise InputError(f"query items must be 0 or more, got {query_items}")
    if not (0 <= harms and 0 <= helps and harms + helps <= n and n >= 1):
        raise InputError(f"need 0 <= harms + helps <= n, got {harms} + {helps} of {n}")
    return math.sqrt((harms + helps + 1) / (n + 1) * (1 / n + 1 / query_items))


def harms_and_helps(full_right: np.ndarray, exit_right: np.ndarray) -> tuple[int, int]:
    """(items right at full depth but wrong at the exit, items wrong at full depth but right at the exit)."""
    return int((full_right & ~exit_right).sum()), int((~full_right & exit_right).sum())


def fixed_sequence(pvalues: Iterable[float], delta: float) -> int:
    """Index of the last hypothesis rejected before the first one that is not (-1: none): fixed-sequence testing,
    family-wise error at most delta for a sequence ordered before seeing the data. `pvalues` may be lazy: none
    after the first not rejected is computed."""
    last = -1
    for i, p in enumerate(pvalues):
        if p > delta:
            break
        last = i
    return last


BETTING_CAP = 0.5  # the largest bet, as a share of what keeps the capital positive (Waudby-Smith and Ramdas: 1/2)
BETTING_SEED = 0  # the fixed order the items are bet on


def mean_below_pvalue(values: np.ndarray, bound: float, alpha: float) -> float:
    """p-value of H0: E[x] >= bound, for values x in [0, 1] drawn independently: an exact test by betting
    (Waudby-Smith and Ramdas 2023, "Estimating means of bounded random variables by betting").

    A gambler starts with capital 1 and, item by item in a fixed seeded order, stakes lambda_i on x_i falling below
    the bound: capital *= 1 + lambda_i (bound - x_i). Under H0 the capital is a nonnegative supermartingale, so by
    Ville's inequality it reaches 1/alpha with probability at most alpha; the p-value is 1 / (the largest capital).
    The bets are predictable plug-ins tuned for level alpha over n items: lambda_i = sqrt(2 log(1/alpha) / (n
    var_{i-1})), capped at BETTING_CAP / (1 - bound), where var_{i-1} is a running variance of the items before.
    Its width is about sqrt(2 log(1/alpha)) standard errors, and, unlike Hoeffding's, it follows the variance."""
    x = np.asarray(values, dtype=np.float64).ravel()
    if x.size == 0:
        return 1.0
    if not (np.all(x >= -1e-12) and np.all(x <= 1 + 1e-12)):
        raise InputError("the betting test needs values in [0, 1]")
    if not 0 < alpha < 1:
        raise InputError(f"alpha must lie in (0, 1), got {alpha}")
    if bound <= 0 or bound >= 1:
        return 1.0  # no bet is possible at these bounds (the cap needs 0 < bound < 1): never rejected, conservative
    x = x[np.random.default_rng(BETTING_SEED).permutation(x.size)]
    n = x.size
    t = np.arange(1, n + 1)
    means = (0.5 + np.cumsum(x)) / (t + 1)  # mean after item i, with a prior of 1/2
    previous = np.concatenate([[0.5], means[:-1]])  # the mean before item i
    variances = (0.25 + np.cumsum((x - previous) ** 2)) / (t + 1)
    before = np.concatenate([[0.25], variances[:-1]])  # the variance before item i: predictable
    bets = np.minimum(np.sqrt(2 * math.log(1 / alpha) / (n * before)), BETTING_CAP / (1 - bound))
    log_capital = np.cumsum(np.log1p(bets * (bound - x)))
    return float(min(1.0, math.exp(-max(0.0, float(log_capital.max())))))


def certified_within_budget(shares: Iterable[np.ndarray], budget: float, alpha: float) -> int:
    """How many settings of a path, taken from its cheapest, are certified to run at most `budget` of the layers
    on average: each setting's per-item shares of layers run (in [0, 1]) test H0 "mean above the budget" by
    betting at level alpha, in turn, until the first not rejected (fixed-sequence testing: with probability at
    least 1 - alpha, every certified setting is within the budget). `shares` may be lazy. A budget of 1 (every
    layer) certifies every setting: no share exceeds it."""
    if not 0 < budget <= 1:
        raise InputError(f"depth budget must lie in (0, 1], got {budget}")
    if budget >= 1:
        return sum(1 for _ in shares)
    return 1 + fixed_sequence((mean_below_pvalue(x, budget, alpha) for x in shares), alpha)


def mean_upper_bound(values: np.ndarray, alpha: float) -> float:
    """The smallest bound whose H0 (E[x] >= bound) mean_below_pvalue rejects at level alpha: a 1 - alpha upper
    confidence bound on the mean of values in [0, 1] (reported as evidence)."""
    x = np.asarray(values, dtype=np.float64)
    low, high = float(x.mean()) if x.size else 0.0, 1.0
    if mean_below_pvalue(x, high - 1e-9, alpha) > alpha:
        return 1.0
    for _ in range(_BISECTIONS):
        middle = (low + high) / 2
        if mean_below_pvalue(x, middle, alpha) <= alpha:
            high = middle
        else:
            low = middle
    return high
