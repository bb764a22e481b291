"""The off-domain gate: thresholds from calibration items, conformal p-values, the stream test's CUSUM, and the
decisions it changes (exit at full depth, with the reason)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from raee.accuracy_rule import AccuracyRuleConfig, estimated_accuracy
from raee.exits import RecordArrays, Resolved, decide
from raee.offdomain import (
    QUANTILE_POINTS,
    OffDomainGate,
    StreamMonitor,
    conformal_pvalues,
    cusum_alarms,
    fit_similarity,
    off_domain_reasons,
)
from raee.records import ExitRecords


def make_gate(nearest, alpha=0.1, min_agreement=-math.inf, stream_p=1e-3, k=4) -> OffDomainGate:
    threshold, quantiles = fit_similarity(nearest, alpha)
    return OffDomainGate(alpha, threshold, min_agreement, k, 0.05, quantiles, len(nearest), stream_p)


def test_thresholds_flag_about_alpha_of_in_domain_queries():
    rng = np.random.default_rng(0)
    calibration = rng.normal(0.8, 0.05, 20000)
    gate = make_gate(calibration, alpha=0.1)
    assert gate.min_similarity == pytest.approx(np.quantile(calibration, 0.05))
    fresh = rng.normal(0.8, 0.05, 20000)
    assert np.mean(fresh < gate.min_similarity) == pytest.approx(0.05, abs=0.01)
    p = conformal_pvalues(gate, fresh)
    assert np.mean(p) == pytest.approx(0.5, abs=0.01) and np.mean(p <= 0.1) == pytest.approx(0.1, abs=0.01)
    assert np.all(conformal_pvalues(gate, np.array([0.0, 2.0])) == [1 / 20001, 1.0])
    assert len(gate.similarity_quantiles) == QUANTILE_POINTS
    assert OffDomainGate.from_dict(gate.to_dict()).min_similarity == gate.min_similarity


def test_cusum_hand_computed_and_carried_over():
    gate = make_gate(np.linspace(0, 1, 101), stream_p=math.exp(-2))  # alarm when the sum reaches 2
    pvalues = np.array([1e-2, 1e-2, 1.0, 1e-4])
    # log e = log 0.5 - 0.5 log p: 1.609, 1.609, -0.693, 3.912 -> S = 1.609, 3.219, 2.526, 6.438
    alarms, state = cusum_alarms(pvalues, 0.0, gate)
    assert alarms.tolist() == [False, True, True, True] and state == pytest.approx(6.438, abs=1e-3)
    monitor = StreamMonitor(gate)
    assert np.concatenate([monitor.update(pvalues[:2]), monitor.update(pvalues[2:])]).tolist() == alarms.tolist()
    assert cusum_alarms(np.full(5, 1.0), 0.0, gate)[1] == 0.0  # never below zero


def test_stream_test_rarely_fires_in_domain_and_soon_on_a_shifted_stream():
    rng = np.random.default_rng(1)
    gate = make_gate(rng.random(10000), stream_p=1e-3)
    in_domain, _ = cusum_alarms(rng.random(20000), 0.0, gate)
    assert in_domain.mean() < 0.005
    shifted, _ = cusum_alarms(rng.random(300) * 0.1, 0.0, gate)  # queries farther than 90% of calibration items
    assert shifted[30:].all()


def test_reasons_in_order_of_the_tests():
    gate = make_gate(np.linspace(0.5, 1.0, 1001), alpha=0.2, min_agreement=0.4)  # far below 0.55
    reasons = off_domain_reasons(gate, np.array([0.5, 0.9, 0.9, 0.9]), np.array([0.1, 0.3, 0.9, 0.9]),
                                 np.array([True, True, True, False]))
    assert reasons.tolist() == ["far", "disagree", "shifted", ""]


def test_decide_sends_flagged_queries_to_full_depth():
    # 4 store items, layers 0..3; every item right at layer 1 only
    logits = np.tile(np.array([[0.0, 1.0], [1.0, 0.0], [0.0, 1.0], [0.0, 1.0]], dtype=np.float32), (4, 1, 1))
    arrays = RecordArrays(ExitRecords(np.zeros(4, dtype=np.int64), logits))
    rule = AccuracyRuleConfig(k=4, prior=0)
    gate = make_gate(np.linspace(0.6, 1.0, 1001), alpha=0.1)  # far below 0.62
    sims = np.array([[0.9, 0.9, 0.8, 0.8], [0.5, 0.5, 0.4, 0.4], [0.9, 0.9, 0.8, 0.8]], dtype=np.float32)
    ids = np.tile(np.arange(4), (3, 1))
    decision = decide(Resolved(rule=rule, gate=gate), sims, ids, arrays, key_layer=0,
                      alarms=np.array([False, False, True]))
    assert decision.exits.tolist() == [1, 3, 3]
    assert decision.off_domain.tolist() == ["", "far", "shifted"]
    ungated = decide(Resolved(rule=rule), sims, ids, arrays, key_layer=0)
    assert ungated.exits.tolist() == [1, 1, 1] and ungated.off_domain.tolist() == ["", "", ""]


@pytest.mark.parametrize("rule", [AccuracyRuleConfig(k=4, temperature=0.05),  # the gate shares the rule's sums
                                  AccuracyRuleConfig(k=4, temperature=0.05, values="confidence"),
                                  AccuracyRuleConfig(k=3, temperature=0.05), AccuracyRuleConfig(k=4, temperature=0.2)])
def test_the_gates_agreement_is_the_share_right_at_the_exit_whether_or_not_it_shares_the_rules_sums(rule):
    rng = np.random.default_rng(4)
    logits = rng.normal(size=(30, 4, 2)).astype(np.float32)
    arrays = RecordArrays(ExitRecords(rng.integers(0, 2, 30), logits))
    sims = np.sort(rng.uniform(0.6, 1.0, (40, 4)), axis=1)[:, ::-1].astype(np.float32)
    ids = np.stack([rng.choice(30, 4, replace=False) for _ in range(40)])
    exits = decide(Resolved(rule=rule), sims, ids, arrays, key_layer=0).exits
    agreement_rule = AccuracyRuleConfig(k=4, temperature=0.05)
    agreement = estimated_accuracy(sims, ids, arrays.values("correct"), agreement_rule, prior=False)[np.arange(40),
                                                                                                       exits]
    gate = make_gate(np.linspace(0.0, 0.5, 1001), alpha=0.0, min_agreement=float(np.median(agreement)), k=4)
    decision = decide(Resolved(rule=rule, gate=gate), sims, ids, arrays, key_layer=0)
    expected = np.where(agreement < gate.min_agreement, "disagree", "")
    assert decision.off_domain.tolist() == expected.tolist() and 0 < (expected == "disagree").sum() < 40


@pytest.mark.parametrize("bad", [dict(alpha=1.0), dict(stream_p=1.0), dict(kappa=1.0)])
def test_bad_gates_are_refused(bad):
    from raee.errors import InputError
    base = make_gate(np.linspace(0, 1, 11)).to_dict()
    with pytest.raises(InputError):
        OffDomainGate.from_dict({**base, **bad})
