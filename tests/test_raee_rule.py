"""The RAEE rule: hand-computed cases, edge cases, and the vectorised code against a slow reference of the rule."""

from __future__ import annotations

import math

import numpy as np
import pytest

from raee.errors import InputError
from raee.raee_rule import RaeeConfig, closeness_weights, exit_layers_from_scores, layer_scores, raee_exit_layers


def reference_exit_layer(sims, ids, record_probability, config):
    """Algorithm 'Infer' of ../shared/RAEE.md for one query, written as plainly as possible: the reference code's
    weights divide squared L2 distances (d2 = 2 - 2s for unit keys); `weights="unsquared"` divides distances."""
    num_layers = record_probability.shape[1] - 1
    found = [(s, j) for s, j in list(zip(sims, ids))[:config.k] if j >= 0]
    if not found:
        return num_layers
    squared = config.weights == "squared"
    distances = [max(2 - 2 * float(s), 0) if squared else math.sqrt(max(2 - 2 * float(s), 0)) for s, _ in found]
    distances = [d + 1e-6 for d in distances]
    d_min = min(distances)
    scores = [0.0] * (num_layers + 1)
    for (s, j), d in zip(found, distances):
        records = [(layer, float(p)) for layer, p in enumerate(record_probability[j]) if p > 0]
        if config.use_tau:
            kept = [(layer, p) for layer, p in records if p >= config.tau]
            if not kept:
                kept = sorted(records, key=lambda r: (-r[1], r[0]))[:config.fallback_top]
        else:
            kept = records
        for layer, p in kept:
            scores[layer] += p * d_min / d
    best = max(scores)
    if best == 0:
        return num_layers
    return next(layer for layer, s in enumerate(scores) if s >= config.earliest_ratio * best * (1 - 1e-9))


def test_hand_computed_case():
    # 3 items, layers 0..3. Item 0: right at 2 (0.95) and 3 (0.97). Item 1: right at 1 (0.6), 2 (0.7), 3 (0.8)
    # and 0 (0.55): below tau, so its top 3 (layers 3, 2, 1) count. Item 2: never right.
    records = np.array([[0, 0, 0.95, 0.97], [0.55, 0.6, 0.7, 0.8], [0, 0, 0, 0]], dtype=np.float32)
    sims = np.array([[1.0, 0.5, 0.0]])  # squared distances 0, 1, 2
    ids = np.array([[1, 0, 2]])
    config = RaeeConfig(k=3, tau=0.9)
    w = closeness_weights(sims, ids >= 0)[0]
    assert w[0] == pytest.approx(1.0) and w[1] == pytest.approx(1e-6, rel=1e-3) and w[2] == pytest.approx(5e-7,
                                                                                                          rel=1e-3)
    scores = layer_scores(sims, ids, records, config)[0]
    # item 1 (weight 1): layers 1,2,3 -> 0.6, 0.7, 0.8; item 0 (weight ~1e-6) barely adds to 2 and 3
    assert scores == pytest.approx([0, 0.6, 0.7, 0.8], abs=1e-4)
    assert raee_exit_layers(sims, ids, records, config)[0] == 3
    # Two equally close neighbours: item 0 gives 2 -> .95, 3 -> .97; item 1 gives 1 -> .6, 2 -> .7, 3 -> .8
    sims, ids = np.array([[0.5, 0.5]]), np.array([[0, 1]])
    assert layer_scores(sims, ids, records, RaeeConfig(k=2))[0] == pytest.approx([0, 0.6, 1.65, 1.77], abs=1e-5)


def test_weights_divide_squared_distances():
    # similarity 0.9 -> d2 0.2, similarity 0.6 -> d2 0.8: squared weight 0.25, unsquared 0.5
    sims, ids = np.array([[0.9, 0.6, 0.6, 0.6]]), np.array([[0, 1, 2, 3]])
    np.testing.assert_allclose(closeness_weights(sims, ids >= 0)[0], [1, 0.25, 0.25, 0.25], rtol=1e-5)
    np.testing.assert_allclose(closeness_weights(sims, ids >= 0, "unsquared")[0], [1, 0.5, 0.5, 0.5], rtol=1e-5)
    # the closest neighbour is right at layer 1, three farther ones at layer 3 (0.95 each)
    records = np.array([[0, 0.95, 0, 0]] + [[0, 0, 0, 0.95]] * 3, dtype=np.float32)
    assert raee_exit_layers(sims, ids, records, RaeeConfig(k=4))[0] == 1  # 0.95 vs 3 * 0.25 * 0.95
    assert raee_exit_layers(sims, ids, records, RaeeConfig(k=4, weights="unsquared"))[0] == 3  # vs 3 * 0.5 * 0.95


def test_ties_go_to_the_earliest_layer():
    records = np.array([[0, 0.95, 0.95, 0]], dtype=np.float32)
    assert raee_exit_layers(np.array([[0.9]]), np.array([[0]]), records, RaeeConfig(k=1))[0] == 1


def test_no_contributing_neighbour_means_full_depth():
    records = np.zeros((2, 5), dtype=np.float32)
    assert raee_exit_layers(np.array([[0.9, 0.1]]), np.array([[0, 1]]), records, RaeeConfig(k=2))[0] == 4


def test_missing_neighbours_are_ignored():
    records = np.array([[0, 0, 0.99]], dtype=np.float32)
    exits = raee_exit_layers(np.array([[0.8, -3.4e38]]), np.array([[0, -1]]), records, RaeeConfig(k=2))
    assert exits[0] == 2
    assert raee_exit_layers(np.array([[-3.4e38]]), np.array([[-1]]), records, RaeeConfig(k=1))[0] == 2


def test_only_the_first_k_neighbours_count():
    records = np.array([[0, 0.95, 0], [0, 0, 0.99]], dtype=np.float32)
    sims, ids = np.array([[0.9, 0.8]]), np.array([[0, 1]])
    assert raee_exit_layers(sims, ids, records, RaeeConfig(k=1))[0] == 1
    assert raee_exit_layers(sims, ids, records, RaeeConfig(k=2))[0] == 1  # 0.95 vs 0.99 * 0.2 / 0.4


def test_earliest_ratio_trades_depth_for_score():
    scores = np.array([[0.0, 0.5, 0.85, 1.0], [0.2, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
    assert exit_layers_from_scores(scores, 1.0).tolist() == [3, 0, 3]  # RAEE: argmax; nothing -> full depth
    assert exit_layers_from_scores(scores, 0.8).tolist() == [2, 0, 3]  # earliest layer within 80% of the best
    assert exit_layers_from_scores(scores, 0.5).tolist() == [1, 0, 3]
    with pytest.raises(InputError):
        RaeeConfig(earliest_ratio=0)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("k", [1, 3, 12, 40])
def test_vectorised_rule_matches_the_reference(seed, k):
    rng = np.random.default_rng(seed)
    n, layers, q, width = 60, 7, 30, 48
    correct = rng.random((n, layers)) < 0.5
    records = np.where(correct, rng.uniform(0.5, 1.0, (n, layers)), 0).astype(np.float32)
    sims = np.sort(rng.uniform(-0.2, 1.0, (q, width)), axis=1)[:, ::-1].astype(np.float32)
    ids = rng.integers(0, n, (q, width))
    ids[rng.random((q, width)) < 0.05] = -1
    ids[:, 0] = rng.integers(0, n, q)  # at least one neighbour found
    for config in (RaeeConfig(k=k), RaeeConfig(k=k, tau=0.7, fallback_top=2), RaeeConfig(k=k, use_tau=False),
                   RaeeConfig(k=k, weights="unsquared"), RaeeConfig(k=k, earliest_ratio=0.6)):
        ours = raee_exit_layers(sims, ids, records, config)
        expected = [reference_exit_layer(sims[i], ids[i], records, config) for i in range(q)]
        assert ours.tolist() == expected, config


@pytest.mark.parametrize("bad", [dict(k=0), dict(k=2.5), dict(k=2000), dict(tau=1.5), dict(fallback_top=0),
                                 dict(weights="cubed")])
def test_bad_configuration_is_refused(bad):
    with pytest.raises(InputError):
        RaeeConfig(**bad)


def test_settings_from_a_manifest():
    assert RaeeConfig.from_dict({"k": 8, "tau": 0.5}) == RaeeConfig(k=8, tau=0.5, weights="squared")
    with pytest.raises(InputError, match="unknown RAEE setting"):
        RaeeConfig.from_dict({"kk": 1})
