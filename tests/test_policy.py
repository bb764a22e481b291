"""RAEE's exit policy: a hand-computed case, edge cases, and the vectorised code against a slow obvious reference."""

from __future__ import annotations

import math

import numpy as np
import pytest

from raee.errors import InputError
from raee.policy import RaeeConfig, closeness_weights, layer_scores, raee_exit_layers


def reference_exit_layer(sims, ids, record_probability, config):
    """Algorithm 'Infer' of ../shared/RAEE.md, one query, written as plainly as possible."""
    num_layers = record_probability.shape[1] - 1
    found = [(s, j) for s, j in zip(sims, ids) if j >= 0]
    distances = [math.sqrt(max(2 - 2 * s, 0)) + 1e-6 for s, _ in found]
    d_min = min(distances)
    scores = [0.0] * (num_layers + 1)
    for (s, j), d in zip(found, distances):
        records = [(layer, p) for layer, p in enumerate(record_probability[j]) if p > 0]
        if config.use_tau:
            kept = [(layer, p) for layer, p in records if p >= config.tau]
            if not kept:
                kept = sorted(records, key=lambda r: (-r[1], r[0]))[:config.fallback_top]
        else:
            kept = records
        for layer, p in kept:
            scores[layer] += p * d_min / d
    best = max(scores)
    return num_layers if best == 0 else scores.index(best)


def test_hand_computed_case():
    # 3 items, layers 0..3. Item 0: right at 2 (0.95) and 3 (0.97). Item 1: right at 1 (0.6), 2 (0.7), 3 (0.8)
    # and 0 (0.55): below tau, so its top 3 (layers 3, 2, 1) count. Item 2: never right.
    records = np.array([[0, 0, 0.95, 0.97], [0.55, 0.6, 0.7, 0.8], [0, 0, 0, 0]], dtype=np.float32)
    sims = np.array([[1.0, 0.5, 0.0]])  # distances 0, 1, sqrt(2)
    ids = np.array([[1, 0, 2]])
    config = RaeeConfig(k=3, tau=0.9)
    w = closeness_weights(sims, ids >= 0)[0]
    assert w[0] == pytest.approx(1.0) and w[1] == pytest.approx(1e-6, abs=1e-5)
    scores = layer_scores(sims, ids, records, config)[0]
    # item 1 (weight 1): layers 1,2,3 -> 0.6, 0.7, 0.8; item 0 (weight ~1e-6) barely adds to 2 and 3
    assert scores == pytest.approx([0, 0.6, 0.7, 0.8], abs=1e-4)
    assert raee_exit_layers(sims, ids, records, config)[0] == 3
    # Two equally close neighbours: item 0 gives 2 -> .95, 3 -> .97; item 1 gives 1 -> .6, 2 -> .7, 3 -> .8
    sims = np.array([[0.5, 0.5]])
    ids = np.array([[0, 1]])
    assert layer_scores(sims, ids, records, RaeeConfig(k=2))[0] == pytest.approx([0, 0.6, 1.65, 1.77], abs=1e-5)


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


def test_without_tau_every_correct_record_counts():
    records = np.array([[0.99, 0.2, 0.2, 0.2, 0.2, 0.2, 0.2]], dtype=np.float32)
    sims, ids = np.array([[0.7]]), np.array([[0]])
    assert raee_exit_layers(sims, ids, records, RaeeConfig(k=1))[0] == 0
    # fallback does not apply: the single 0.99 passes tau; without tau, layers 1..6 still lose to 0.99 each
    assert raee_exit_layers(sims, ids, records, RaeeConfig(k=1, use_tau=False))[0] == 0


def test_earliest_ratio_trades_depth_for_score():
    from raee.policy import exit_layers_from_scores
    scores = np.array([[0.0, 0.5, 0.85, 1.0], [0.2, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
    assert exit_layers_from_scores(scores, 1.0).tolist() == [3, 0, 3]  # RAEE: argmax; nothing -> full depth
    assert exit_layers_from_scores(scores, 0.8).tolist() == [2, 0, 3]  # earliest layer within 80% of the best
    assert exit_layers_from_scores(scores, 0.5).tolist() == [1, 0, 3]
    records = np.array([[0, 0.92, 0.95, 0.99]], dtype=np.float32)
    sims, ids = np.array([[0.9]]), np.array([[0]])
    assert raee_exit_layers(sims, ids, records, RaeeConfig(k=1)) == [3]
    assert raee_exit_layers(sims, ids, records, RaeeConfig(k=1, earliest_ratio=0.9)) == [1]
    with pytest.raises(InputError):
        RaeeConfig(earliest_ratio=0)


@pytest.mark.parametrize("seed", range(5))
def test_vectorised_policy_matches_reference(seed):
    rng = np.random.default_rng(seed)
    n, layers, q, k = 50, 7, 40, 12
    correct = rng.random((n, layers)) < 0.5
    records = np.where(correct, rng.uniform(0.5, 1.0, (n, layers)), 0).astype(np.float32)
    sims = np.sort(rng.uniform(-0.2, 1.0, (q, k)), axis=1)[:, ::-1]
    ids = rng.integers(0, n, (q, k))
    ids[rng.random((q, k)) < 0.05] = -1
    ids[:, 0] = rng.integers(0, n, q)  # at least one neighbour found
    for config in (RaeeConfig(k=k, tau=0.9), RaeeConfig(k=k, tau=0.7, fallback_top=2), RaeeConfig(k=k, use_tau=False)):
        ours = raee_exit_layers(sims, ids, records, config)
        expected = [reference_exit_layer(sims[i], ids[i], records, config) for i in range(q)]
        assert ours.tolist() == expected


@pytest.mark.parametrize("bad", [dict(k=0), dict(k=2.5), dict(tau=1.5), dict(fallback_top=0)])
def test_bad_configuration_is_refused(bad):
    with pytest.raises(InputError):
        RaeeConfig(**bad)
