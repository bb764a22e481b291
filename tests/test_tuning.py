"""The tuning grid (raee-index tune): its logit-scaling shortcut for the sentence-encoder scale, and its choice."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from raee.build import run_calibration_pass
from raee.data import Example
from raee.errors import InputError
from raee.keys import KeySpec
from raee.tasks import BUILTIN_TASKS
from raee.tuning import choose, grid_search
from tests.tiny import synthetic_texts, tiny_backbone

TASK = BUILTIN_TASKS["sst2"]
GRID = dict(ks=[4, 12], taus=[0.6, 0.9], ratios=[1.0, 0.7], holdout=0.25, seed=3)


@pytest.fixture(scope="module")
def examples() -> list[Example]:
    return [Example(text, TASK.labels.index(label), line)
            for line, (text, label) in enumerate(synthetic_texts(160, seed=11), start=1)]


def calibration(examples, scale: float):
    backbone = tiny_backbone("bert-encoder", scale=scale)
    return run_calibration_pass(backbone, TASK, examples, KeySpec("prefix", 1), progress=False)


def test_scaling_the_recorded_logits_is_rebuilding_at_that_scale(examples):
    """The grid tries sentence-encoder scales without a pass per scale: logits at scale s are the base scale's
    times s / base. Each scaled trial must equal the same trial on a pass actually run at that scale."""
    base = calibration(examples, 20.0)
    keys = {"prefix:1": base.keys}
    shortcut = grid_search(base.records, keys, TASK.metric, scales=[10.0, 40.0], base_scale=20.0, **GRID)
    for scale in (10.0, 40.0):
        rebuilt = calibration(examples, scale)
        np.testing.assert_allclose(rebuilt.records.label_logits, base.records.label_logits * scale / 20.0,
                                   rtol=1e-5, atol=1e-6)
        direct = grid_search(rebuilt.records, {"prefix:1": rebuilt.keys}, TASK.metric, **GRID)
        assert [dataclasses.replace(t, scale=None) for t in shortcut if t.scale == scale] == direct
    assert len({t.score for t in shortcut}) > 1  # the trials differ: the comparison above means something


def test_choose_takes_the_best_score_within_the_depth_budget(examples):
    base = calibration(examples, 20.0)
    budget = 0.8
    results = grid_search(base.records, {"prefix:1": base.keys}, TASK.metric, **GRID, depth_budget=budget)
    chosen = choose(results, 3)
    inside = [r for r in results if r.within_budget]
    assert inside and chosen in inside and all(r.avg_layers_run / 3 <= budget for r in inside)
    assert chosen.score == max(r.score for r in inside)
    with pytest.raises(InputError):
        choose(grid_search(base.records, {"prefix:1": base.keys}, TASK.metric, **GRID), 3)  # no budget given


def test_trials_search_the_index_a_build_would_serve(examples, monkeypatch):
    import raee.tuning
    from raee.index import IndexSpec
    seen = []
    real = raee.tuning.build_index
    monkeypatch.setattr(raee.tuning, "build_index", lambda keys, spec: seen.append(spec.type) or real(keys, spec))
    base = calibration(examples, 20.0)
    grid_search(base.records, {"prefix:1": base.keys}, TASK.metric, **GRID)
    grid_search(base.records, {"prefix:1": base.keys}, TASK.metric, **GRID, index_spec=IndexSpec("flat"))
    assert seen == [IndexSpec().type, "flat"]


def test_trials_are_certified_cheapest_first_at_delta_over_the_paths(examples, monkeypatch):
    import raee.tuning
    calls = []
    real = raee.tuning.certified_within_budget

    def spy(shares, budget, alpha):
        shares = list(shares)
        calls.append((alpha, [float(s.mean()) for s in shares]))
        return real(iter(shares), budget, alpha)
    monkeypatch.setattr(raee.tuning, "certified_within_budget", spy)
    base = calibration(examples, 20.0)
    results = grid_search(base.records, {"prefix:1": base.keys}, TASK.metric, **GRID, depth_budget=0.8, delta=0.08)
    paths = len(GRID["ks"]) * len(GRID["taus"])
    assert [alpha for alpha, _ in calls] == [pytest.approx(0.08 / paths)] * paths
    assert all(means == sorted(means) for _, means in calls)  # cheapest (lowest ratio) first
    assert [r.earliest_ratio for r in results[:len(GRID["ratios"])]] == sorted(GRID["ratios"])
    with pytest.raises(InputError):
        grid_search(base.records, {"prefix:1": base.keys}, TASK.metric, **{**GRID, "ratios": [1.0, 1.5]})
