"""Our accuracy rule: a hand-computed case and the vectorised code against a slow reference of the formula."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest

from raee.accuracy_rule import (
    AccuracyRuleConfig,
    accuracy_exit_layers,
    estimated_accuracy,
    voted_accuracy,
    weighted_records,
)
from raee.errors import InputError


def reference_exit_layer(sims, ids, values, config, key_layer, gold=None, predicted=None):
    """a_l = (sum_j w_j v_jl + m vbar_l) / (sum_j w_j + m), w_j = exp((s_j - s_best) / T); exit = argmax of
    a_l - cost * max(l, K) / L if it beats full depth's by margin. With key_layers=votes, for l <= K:
    a_l = (sum_j w_j [gold_j = predicted_l] + m P(gold = predicted_l)) / (sum_j w_j + m)."""
    num_layers = values.shape[1] - 1
    found = [(float(s), j) for s, j in list(zip(sims, ids))[:config.k] if j >= 0]
    if not found:
        return num_layers
    best = max(s for s, _ in found)
    weights = [math.exp((s - best) / config.temperature) for s, _ in found]
    prior = values.mean(axis=0)
    net = []
    for layer in range(num_layers + 1):
        total = sum(w * float(values[j, layer]) for w, (_, j) in zip(weights, found)) + config.prior * prior[layer]
        if config.key_layers == "votes" and layer <= key_layer:
            label = predicted[layer]
            total = (sum(w for w, (_, j) in zip(weights, found) if gold[j] == label)
                     + config.prior * float(np.mean(gold == label)))
        estimate = total / (sum(weights) + config.prior)
        net.append(estimate - config.cost * max(layer, key_layer) / num_layers)
    choice = max(range(num_layers + 1), key=lambda layer: (net[layer], -layer))
    return choice if net[choice] - net[num_layers] >= config.margin - 1e-12 else num_layers


def test_hand_computed_case():
    # two neighbours at equal similarity: one right at layers 1 and 3, the other at 3 only; no prior
    values = np.array([[0, 1, 0, 1], [0, 0, 0, 1]], dtype=np.float32)
    sims, ids = np.array([[0.8, 0.8]]), np.array([[0, 1]])
    config = AccuracyRuleConfig(k=2, prior=0)
    np.testing.assert_allclose(estimated_accuracy(sims, ids, values, config)[0], [0, 0.5, 0, 1])
    assert accuracy_exit_layers(sims, ids, values, config, key_layer=0)[0] == 3
    # a cost of 0.9 per share of layers: layer 1 nets 0.5 - 0.3 = 0.2, layer 3 nets 1 - 0.9 = 0.1
    assert accuracy_exit_layers(sims, ids, values, AccuracyRuleConfig(k=2, prior=0, cost=0.9), 0)[0] == 1
    # ... unless layer 1 must beat full depth by 0.15 (it beats it by 0.1)
    assert accuracy_exit_layers(sims, ids, values, AccuracyRuleConfig(k=2, prior=0, cost=0.9, margin=0.15),
                                0)[0] == 3
    # with a prefix key at layer 2, layers 0..2 cost the same: layer 1 nets 0.5 - 0.6 < layer 3's 0.1
    assert accuracy_exit_layers(sims, ids, values, AccuracyRuleConfig(k=2, prior=0, cost=0.9), 2)[0] == 3


def test_closer_neighbours_weigh_more_and_the_prior_pulls_to_the_store_average():
    values = np.array([[1, 0], [0, 1], [0, 1], [0, 1]], dtype=np.float32)
    sims, ids = np.array([[0.9, 0.8]]), np.array([[0, 1]])
    weight = math.exp(-0.1 / 0.05)
    estimate = estimated_accuracy(sims, ids, values, AccuracyRuleConfig(k=2, prior=0))[0]
    np.testing.assert_allclose(estimate, [1 / (1 + weight), weight / (1 + weight)], rtol=1e-6)
    shrunk = estimated_accuracy(sims, ids, values, AccuracyRuleConfig(k=2, prior=2))[0]
    np.testing.assert_allclose(shrunk, [(1 + 2 * 0.25) / (1 + weight + 2), (weight + 2 * 0.75) / (1 + weight + 2)],
                               rtol=1e-6)


def test_no_neighbour_means_full_depth():
    values = np.ones((3, 4), dtype=np.float32)
    assert accuracy_exit_layers(np.array([[-3.4e38]]), np.array([[-1]]), values, AccuracyRuleConfig(k=1), 0)[0] == 3


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("k", [1, 5, 32])
def test_vectorised_rule_matches_the_reference(seed, k):
    rng = np.random.default_rng(seed)
    n, layers, q, width = 50, 7, 25, 40
    values = (rng.random((n, layers)) < 0.6).astype(np.float32) * rng.uniform(0.5, 1, (n, layers)).astype(
        np.float32)
    sims = np.sort(rng.uniform(0.2, 1.0, (q, width)), axis=1)[:, ::-1].astype(np.float32)
    ids = rng.integers(0, n, (q, width))
    ids[rng.random((q, width)) < 0.05] = -1
    ids[:3] = -1  # some queries find nothing
    for config in (AccuracyRuleConfig(k=k), AccuracyRuleConfig(k=k, temperature=0.2, prior=0.5, cost=0.3),
                   AccuracyRuleConfig(k=k, margin=0.1), AccuracyRuleConfig(k=k, cost=1.5, prior=0)):
        for key_layer in (0, 2):
            ours = accuracy_exit_layers(sims, ids, values, config, key_layer)
            expected = [reference_exit_layer(sims[i], ids[i], values, config, key_layer) for i in range(q)]
            assert ours.tolist() == expected, (config, key_layer)
            served = accuracy_exit_layers(sims, ids, values, config, key_layer, values.mean(axis=0))
            assert served.tolist() == expected, (config, key_layer)  # the engine passes the store's mean, cached
        plain = estimated_accuracy(sims, ids, values, config)
        np.testing.assert_allclose(estimated_accuracy(sims, ids, values, config, store_mean=values.mean(axis=0)), plain)
        if config.prior:  # the mean passed is the one used
            assert not np.allclose(estimated_accuracy(sims, ids, values, config, store_mean=np.zeros(layers)), plain)
        sums = weighted_records(sims, ids, values, config.k, config.temperature)  # as the engine shares them
        np.testing.assert_array_equal(estimated_accuracy(sims, ids, values, config, weighted=sums), plain)
        np.testing.assert_array_equal(estimated_accuracy(sims, ids, values, config, prior=False, weighted=sums),
                                      estimated_accuracy(sims, ids, values, config, prior=False))
        assert accuracy_exit_layers(sims, ids, values, config, 2, weighted=sums).tolist() == \
            accuracy_exit_layers(sims, ids, values, config, 2).tolist()


def test_votes_read_the_query_s_own_prediction_at_the_key_layers():
    # neighbours' records say layer 1 is rarely right; but the query's own layer-1 answer is the label 3 of 4 of
    # its neighbours carry, so by votes layer 1 is likely right and, with a cost, the query leaves there
    values = np.array([[0, 0, 1], [0, 0, 1], [0, 1, 1], [0, 0, 1]], dtype=np.float32)
    gold = np.array([1, 1, 0, 1])
    labels = np.eye(2)[gold]
    sims, ids = np.array([[0.9, 0.9, 0.9, 0.9]]), np.array([[0, 1, 2, 3]])
    records = AccuracyRuleConfig(k=4, prior=0, cost=0.6)
    votes = dataclasses.replace(records, key_layers="votes")
    predicted = np.array([[0, 1]])  # the query's labels at layers 0 and 1 (the prefix key's)
    np.testing.assert_allclose(voted_accuracy(sims, ids, labels, predicted, votes), [[0.25, 0.75]])
    assert accuracy_exit_layers(sims, ids, values, records, 1)[0] == 2  # net: 0.25 - 0.6 * 1/2 < 1 - 0.6 * 2/2
    by_votes = accuracy_exit_layers(sims, ids, values, votes, 1, labels=labels, predicted=predicted)
    assert by_votes[0] == 1  # net: 0.75 - 0.6 * 1/2 > 1 - 0.6 * 2/2
    with pytest.raises(InputError, match="prefix key"):
        accuracy_exit_layers(sims, ids, values, votes, 1)  # no predictions given
    with pytest.raises(InputError, match="prefix key"):
        accuracy_exit_layers(sims, ids, values, votes, 1, labels=labels, predicted=predicted[:, :1])  # not K+1


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("k", [1, 5, 32])
def test_votes_match_the_reference(seed, k):
    rng = np.random.default_rng(seed)
    n, layers, q, width, classes = 50, 7, 25, 40, 3
    values = (rng.random((n, layers)) < 0.6).astype(np.float32)
    gold = rng.integers(0, classes, n)
    sims = np.sort(rng.uniform(0.2, 1.0, (q, width)), axis=1)[:, ::-1].astype(np.float32)
    ids = rng.integers(0, n, (q, width))
    ids[rng.random((q, width)) < 0.05] = -1
    ids[:3] = -1
    for key_layer in (1, 2):
        predicted = rng.integers(0, classes, (q, key_layer + 1))
        for config in (AccuracyRuleConfig(k=k, key_layers="votes"),
                       AccuracyRuleConfig(k=k, key_layers="votes", prior=0.5, cost=0.4, temperature=0.2),
                       AccuracyRuleConfig(k=k, key_layers="votes", prior=0, cost=1.5)):
            labels = np.eye(classes)[gold]
            served = voted_accuracy(sims, ids, labels, predicted, config, labels.mean(axis=0))  # as the engine does
            if config.prior:  # the mean passed is the one used
                assert not np.allclose(voted_accuracy(sims, ids, labels, predicted, config, np.zeros(classes)), served)
            ours = accuracy_exit_layers(sims, ids, values, config, key_layer, labels=labels, predicted=predicted,
                                        label_mean=labels.mean(axis=0))
            expected = [reference_exit_layer(sims[i], ids[i], values, config, key_layer, gold, predicted[i])
                        for i in range(q)]
            assert ours.tolist() == expected, (config, key_layer)


@pytest.mark.parametrize("bad", [dict(k=0), dict(temperature=0), dict(prior=-1), dict(values="votes"),
                                 dict(key_layers="labels"), dict(margin=-0.1), dict(cost=-1)])
def test_bad_configuration_is_refused(bad):
    with pytest.raises(InputError):
        AccuracyRuleConfig(**bad)
