"""match-full's statistics against brute force: binomial tails summed term by term, the exact size of the test by
enumerating every outcome, fixed-sequence testing against a slow loop, and the whole procedure's error rate on
synthetic records. best's depth budget: the betting test against a slow loop of its capital, its size at the
boundary, its power, and the certified prefix of a path."""

from __future__ import annotations

import math

import numpy as np
import pytest

from raee.errors import InputError
from raee.guarantee import (
    BETTING_CAP,
    BETTING_SEED,
    PairedRiskTest,
    binomial_cdf,
    certified_within_budget,
    clopper_pearson_lower,
    clopper_pearson_upper,
    file_risk_bound,
    file_risk_pvalue,
    fixed_sequence,
    harms_and_helps,
    mean_below_pvalue,
    mean_upper_bound,
    risk_pvalue,
)


def brute_cdf(x, n, p):
    return sum(math.comb(n, k) * p ** k * (1 - p) ** (n - k) for k in range(0, min(x, n) + 1))


@pytest.mark.parametrize("x, n, p", [(0, 10, 0.3), (3, 10, 0.3), (10, 10, 0.5), (40, 200, 0.25), (7, 60, 0.01),
                                     (59, 60, 0.99)])
def test_binomial_cdf_equals_the_sum_of_its_terms(x, n, p):
    assert binomial_cdf(x, n, p) == pytest.approx(brute_cdf(x, n, p), rel=1e-9, abs=1e-15)


@pytest.mark.parametrize("x, n", [(0, 20), (4, 20), (19, 20), (30, 500)])
def test_clopper_pearson_bounds_sit_where_the_tail_equals_alpha(x, n):
    upper, lower = clopper_pearson_upper(x, n, 0.05), clopper_pearson_lower(x, n, 0.05)
    assert brute_cdf(x, n, upper) == pytest.approx(0.05, abs=1e-9)
    assert brute_cdf(x, n, upper - 1e-4) > 0.05
    if x > 0:
        assert 1 - brute_cdf(x - 1, n, lower) == pytest.approx(0.05, abs=1e-9)  # P(X >= x) at the lower bound
    assert lower <= x / n <= upper


def rejected_outcomes(n, epsilon, delta, gamma):
    """Every (harms, helps) outcome of n items the test rejects H0: risk >= epsilon for."""
    return [(h, g) for h in range(n + 1) for g in range(n + 1 - h) if risk_pvalue(h, g, n, epsilon, gamma) <= delta]


def rejection_probability(n, rejected, p_harm, p_help):
    """Exact P(the test rejects) when items are harms, helps or neither with these rates."""
    total = 0.0
    log = math.lgamma
    for h, g in rejected:
        log_p = (log(n + 1) - log(h + 1) - log(g + 1) - log(n - h - g + 1)
                 + (h * math.log(p_harm) if h else 0) + (g * math.log(p_help) if g else 0)
                 + ((n - h - g) * math.log(1 - p_harm - p_help) if n - h - g else 0))
        total += math.exp(log_p)
    return total


@pytest.mark.slow
@pytest.mark.parametrize("epsilon", [0.05, 0.0, -0.05])
def test_the_test_never_rejects_a_true_null_more_often_than_delta(epsilon):
    n, delta, gamma = 30, 0.1, 0.01
    rejected = rejected_outcomes(n, epsilon, delta, gamma)
    worst = 0.0
    for p_help in (0.01, 0.05, 0.1, 0.2, 0.3, 0.4):
        for excess in (0.0, 0.02, 0.1):  # on the boundary of H0, and inside it
            p_harm = p_help + epsilon + excess
            if 0 < p_harm and p_harm + p_help < 1:
                worst = max(worst, rejection_probability(n, rejected, p_harm, p_help))
    assert worst <= delta
    assert worst > delta / 20  # and it is not vacuous: some boundary case comes near its level


def test_the_test_has_power_when_the_risk_is_well_below_epsilon():
    # 5000 items, 5% harms and 8% helps: 3 points better than full depth, far inside "no more than 0.5 below"
    assert risk_pvalue(250, 400, 5000, 0.005, 0.01) < 0.01 + 1e-6  # gamma is the floor
    assert risk_pvalue(0, 0, 5000, 0.005, 0.01) <= 0.01 + 1e-12  # identical to full depth everywhere
    assert risk_pvalue(0, 0, 50, 0.005, 0.01) > 0.1  # ... but 50 items cannot show it


def test_the_upper_bound_inverts_the_test():
    test = PairedRiskTest.of(120, 150, 2000, 0.01)
    bound = test.upper_bound(0.1)
    assert test.pvalue(bound + 1e-6) <= 0.1 < test.pvalue(bound - 1e-3)
    assert bound > (120 - 150) / 2000  # above the observed risk
    with pytest.raises(InputError):
        PairedRiskTest.of(10, 10, 15, 0.01)


def test_fixed_sequence_stops_at_the_first_failure():
    def slow(pvalues, delta):
        accepted = -1
        for i in range(len(pvalues)):
            if all(p <= delta for p in pvalues[:i + 1]):
                accepted = i
        return accepted
    rng = np.random.default_rng(0)
    for _ in range(200):
        pvalues = list(rng.uniform(0, 0.2, rng.integers(0, 8)))
        assert fixed_sequence(pvalues, 0.1) == slow(pvalues, 0.1)
    assert fixed_sequence([0.01, 0.2, 0.01], 0.1) == 0 and fixed_sequence([], 0.1) == -1


def test_harms_and_helps_count_discordant_items():
    full = np.array([True, True, False, False, True])
    exit_ = np.array([True, False, True, False, False])
    assert harms_and_helps(full, exit_) == (2, 1)


@pytest.mark.slow
def test_the_procedure_keeps_its_promise_on_synthetic_records():
    """A path of 10 settings whose true risk grows from -4 to +5 points; each run draws calibration items, tests
    the path in order and keeps the last accepted setting. The share of runs that keep a setting whose true risk is
    above epsilon stays below delta."""
    rng = np.random.default_rng(1)
    epsilon, delta, gamma, n, runs = 0.005, 0.1, 0.01, 400, 300
    p_help = np.full(10, 0.06)
    p_harm = p_help + np.linspace(-0.04, 0.05, 10)  # true risk of each setting
    failures = 0
    for _ in range(runs):
        u = rng.random(n)  # one draw per item, shared along the path: settings are nested like a real path
        harms = [(u < p_harm[s]).sum() for s in range(10)]
        helps = [((u >= p_harm[s]) & (u < p_harm[s] + p_help[s])).sum() for s in range(10)]
        chosen = fixed_sequence([risk_pvalue(int(h), int(g), n, epsilon, gamma) for h, g in zip(harms, helps)],
                                delta)
        failures += chosen >= 0 and p_harm[chosen] - p_help[chosen] > epsilon
    assert failures / runs <= delta + 3 * math.sqrt(delta * (1 - delta) / runs)


def test_the_file_level_pvalue_is_the_normal_tail_of_both_samples_scatter():
    # 2000 calibration items, 100 harms and 160 helps (3 points better), a file of 1000 queries
    scatter = math.sqrt(261 / 2001 * (1 / 2000 + 1 / 1000))
    z = (0.005 - (100 - 160) / 2000) / scatter
    assert file_risk_pvalue(100, 160, 2000, 0.005, 1000) == pytest.approx(0.5 * math.erfc(z / math.sqrt(2)))
    assert file_risk_pvalue(100, 160, 2000, 0.005, 0) == 0.0  # no file-level claim: never the binding test
    # a smaller file scatters more: harder to promise
    assert file_risk_pvalue(100, 160, 2000, 0.005, 200) > file_risk_pvalue(100, 160, 2000, 0.005, 5000)
    assert file_risk_pvalue(0, 0, 2000, 0.005, 2000) < 0.05  # a setting that never disagrees with full depth
    bound = file_risk_bound(100, 160, 2000, 0.1, 1000)  # the bound inverts the test
    assert file_risk_pvalue(100, 160, 2000, bound, 1000) == pytest.approx(0.1)
    assert bound == pytest.approx((100 - 160) / 2000 + 1.2815516 * scatter)
    with pytest.raises(InputError):
        file_risk_pvalue(1, 1, 10, 0.005, -1)


@pytest.mark.slow
def test_the_file_level_claim_holds_on_synthetic_files():
    """The path of the test above, now read on files: each run draws n calibration items and a file of m
    queries, keeps the last setting accepted by both tests, and checks the kept setting's accuracy on the file.
    The share of runs whose file falls more than epsilon below full depth's stays below delta, where with the
    expectation test alone it does not (the kept setting sits at the edge, and the file scatters around it)."""
    rng = np.random.default_rng(2)
    epsilon, delta, gamma, n, m, runs = 0.005, 0.1, 0.01, 3000, 1000, 300
    p_help = np.full(10, 0.08)
    p_harm = p_help + np.linspace(-0.03, 0.03, 10)
    failures = {0: 0, m: 0}
    for _ in range(runs):
        u, v = rng.random(n), rng.random(m)  # calibration items, file queries; nested settings as above
        harms = [(u < p_harm[s]).sum() for s in range(10)]
        helps = [((u >= p_harm[s]) & (u < p_harm[s] + p_help[s])).sum() for s in range(10)]
        for claim in failures:
            chosen = fixed_sequence([max(risk_pvalue(int(h), int(g), n, epsilon, gamma),
                                         file_risk_pvalue(int(h), int(g), n, epsilon, claim))
                                     for h, g in zip(harms, helps)], delta)
            if chosen >= 0:
                file_risk = ((v < p_harm[chosen]).sum() - ((v >= p_harm[chosen]) &
                                                           (v < p_harm[chosen] + p_help[chosen])).sum()) / m
                failures[claim] += file_risk > epsilon
    bound = delta + 3 * math.sqrt(delta * (1 - delta) / runs)
    assert failures[m] / runs <= bound < failures[0] / runs


def slow_betting_pvalue(values, bound, alpha):
    """The capital process written out item by item (Waudby-Smith and Ramdas, predictable plug-in bets)."""
    x = list(np.asarray(values, dtype=float)[np.random.default_rng(BETTING_SEED).permutation(len(values))])
    n = len(x)
    capital, best, mean, variance, total, squares = 1.0, 1.0, 0.5, 0.25, 0.0, 0.0
    for i, value in enumerate(x, start=1):
        bet = min(math.sqrt(2 * math.log(1 / alpha) / (n * variance)), BETTING_CAP / (1 - bound))
        capital *= 1 + bet * (bound - value)
        best = max(best, capital)
        squares += (value - mean) ** 2  # against the mean before this item
        total += value
        mean = (0.5 + total) / (i + 1)
        variance = (0.25 + squares) / (i + 1)
    return min(1.0, 1 / best)


@pytest.mark.parametrize("seed, n, bound", [(0, 50, 0.5), (1, 300, 0.6), (2, 1000, 0.45), (3, 20, 0.9)])
def test_betting_pvalue_equals_a_slow_loop_of_its_capital(seed, n, bound):
    values = np.random.default_rng(seed).choice([1 / 3, 1 / 2, 2 / 3, 5 / 6, 1.0], size=n)
    for alpha in (0.1, 0.011):
        assert mean_below_pvalue(values, bound, alpha) == pytest.approx(slow_betting_pvalue(values, bound, alpha),
                                                                        rel=1e-9)


@pytest.mark.parametrize("levels, weights", [((0.0, 1.0), (0.4, 0.6)),
                                             ((1 / 3, 1 / 2, 2 / 3, 1.0), (0.4, 0.2, 0.1, 0.3)),
                                             ((0.58, 0.62), (0.5, 0.5))])
def test_betting_test_rejects_a_true_null_at_most_alpha_of_the_time(levels, weights):
    """Values drawn with mean exactly at the bound (the hardest case of H0): rejections stay within alpha, with
    three standard errors of slack for the simulation."""
    rng = np.random.default_rng(7)
    bound, alpha, runs = float(np.dot(levels, weights)), 0.1, 1500
    rejections = sum(mean_below_pvalue(rng.choice(levels, size=400, p=weights), bound, alpha) <= alpha
                     for _ in range(runs))
    assert rejections / runs <= alpha + 3 * math.sqrt(alpha * (1 - alpha) / runs)


def test_betting_test_has_power_and_its_bound_covers_the_mean():
    rng = np.random.default_rng(3)
    values = rng.choice([1 / 3, 2 / 3, 1.0], size=5000, p=[0.5, 0.3, 0.2])  # mean 0.567, sd 0.26
    assert mean_below_pvalue(values, 0.6, 0.01) <= 0.01  # 3.3 points of slack, 9 standard errors at n 5000
    assert mean_below_pvalue(values, 0.56, 0.1) > 0.1  # below the sample mean: never rejected
    upper = mean_upper_bound(values, 0.05)
    assert values.mean() < upper < values.mean() + 4 * values.std() / math.sqrt(len(values))
    assert mean_below_pvalue(values, upper + 1e-6, 0.05) <= 0.05 < mean_below_pvalue(values, upper - 1e-3, 0.05)
    assert mean_below_pvalue(values, 1.0, 0.1) == 1.0 and mean_below_pvalue([], 0.5, 0.1) == 1.0
    with pytest.raises(InputError):
        mean_below_pvalue([0.2, 1.5], 0.5, 0.1)


def test_certified_within_budget_stops_at_the_first_setting_not_certified():
    rng = np.random.default_rng(5)
    shares = [rng.choice([1 / 3, 1.0], size=2000, p=[1 - p, p]) for p in (0.1, 0.3, 0.4, 0.5, 0.1)]
    # means about 0.40, 0.53, 0.60, 0.67, 0.40: the fourth fails a 0.6 budget, and the fifth is never tested
    tested = []

    def lazy():
        for x in shares:
            tested.append(len(x))
            yield x
    assert certified_within_budget(lazy(), 0.6, 0.05) in (2, 3)
    assert len(tested) <= 4
    assert certified_within_budget(iter(shares[3:]), 0.6, 0.05) == 0
    assert certified_within_budget(iter([]), 0.6, 0.05) == 0


def test_bets_never_risk_the_whole_capital():
    """Each factor 1 + bet (bound - x) stays at least 1 - BETTING_CAP > 0 for x in [0, 1]: the capital stays
    positive, as Ville's inequality needs."""
    assert 0 < BETTING_CAP < 1
    ones = np.ones(200)
    for bound in (1e-6, 0.5, 0.999999):
        assert 0 < mean_below_pvalue(ones, bound, 0.1) <= 1.0


def test_a_budget_of_every_layer_certifies_every_setting():
    shares = [np.ones(50), np.full(50, 0.9)]
    assert certified_within_budget(iter(shares), 1.0, 0.05) == 2
    with pytest.raises(InputError):
        certified_within_budget(iter(shares), 0.0, 0.05)
