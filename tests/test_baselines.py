"""The policies RAEE is compared against, on hand-computed cases: oracle, calibrated confidence, AdaInfer."""

from __future__ import annotations

import numpy as np

from raee.baselines import (
    LinearSVM,
    adainfer_exit_layers,
    calibrate_confidence,
    confidence_exit_layers,
    first_stop,
    fit_adainfer,
    head_features,
    oracle_exit_layers,
)
from raee.records import ExitRecords


def logits_for(probabilities) -> np.ndarray:
    return np.log(np.asarray(probabilities, dtype=np.float64))


def test_head_features_are_gap_and_top_probability():
    features = head_features(logits_for([[0.7, 0.2, 0.1], [0.4, 0.35, 0.25]]))
    np.testing.assert_allclose(features, [[0.5, 0.7], [0.05, 0.4]], atol=1e-9)


def test_head_features_read_the_full_vocabulary_when_given():
    # binary label words: gap = 2 * top - 1, one feature in two; the vocabulary's top two break the tie
    labels = logits_for([[[0.9, 0.1]], [[0.9, 0.1]]])
    collapsed = head_features(labels)
    assert np.allclose(collapsed[..., 0], 2 * collapsed[..., 1] - 1)
    vocab = np.array([[[0.30, 0.05]], [[0.30, 0.25]]])
    np.testing.assert_allclose(head_features(labels, vocab), [[[0.25, 0.30]], [[0.05, 0.30]]])


def test_oracle_exits_at_the_earliest_right_layer():
    # 3 items, layers 0..2, 2 labels; gold 1, 0, 1
    logits = logits_for([[[0.9, 0.1], [0.4, 0.6], [0.3, 0.7]],   # right first at layer 1
                         [[0.8, 0.2], [0.3, 0.7], [0.6, 0.4]],   # right at 0
                         [[0.9, 0.1], [0.8, 0.2], [0.7, 0.3]]])  # never right -> full depth
    assert oracle_exit_layers(logits, np.array([1, 0, 1])).tolist() == [1, 0, 2]


def test_confidence_thresholds_hand_computed_on_every_item():
    # 10 calibration items, 1 layer + full. Layer-0 confidences 0.95, 0.9, ..., 0.5; the full-depth prediction is
    # label 0 for all; layer 0 predicts label 0 except for the items of confidence 0.85 and 0.6.
    top = np.array([0.95, 0.9, 0.85, 0.8, 0.75, 0.7, 0.65, 0.6, 0.55, 0.5])
    layer0 = np.stack([top, 1 - top], axis=1)
    layer0[[2, 7]] = layer0[[2, 7]][:, ::-1]
    full = np.tile([0.9, 0.1], (10, 1))
    records = ExitRecords(np.zeros(10, dtype=int), np.log(np.stack([layer0, full], axis=1)).astype(np.float32))
    # agreement of the n most confident: 1, 1, 2/3, 3/4, 4/5, 5/6, 6/7, 6/8, 7/9, 8/10
    # target 0.85: the largest n with rate >= 0.85 is n = 7 (6/7 = 0.857): threshold = 7th confidence = 0.65
    np.testing.assert_allclose(calibrate_confidence(records, 0.85), [0.65, 0.0])
    np.testing.assert_allclose(calibrate_confidence(records, 0.8), [0.5, 0.0])  # all ten qualify (8/10)
    np.testing.assert_allclose(calibrate_confidence(records, 0.99), [0.9, 0.0])
    queries = np.log(np.array([[[0.7, 0.3], [0.9, 0.1]], [[0.6, 0.4], [0.9, 0.1]]]))
    assert confidence_exit_layers(calibrate_confidence(records, 0.85), queries).tolist() == [0, 1]


def test_svm_separates_and_adainfer_stops_at_the_first_stop():
    rng = np.random.default_rng(0)
    x = rng.uniform(0, 1, (400, 2))
    y = x[:, 1] > 0.6
    svm = LinearSVM().fit(x, y)
    assert np.mean(svm.decide(x) == y) > 0.95
    assert first_stop(np.array([[False, True, True], [False, False, False]])).tolist() == [1, 2]
    # Calibration: confident layers (top prob >= 0.8) are right, unsure ones wrong
    confident, unsure = [0.9, 0.1], [0.55, 0.45]
    logits = np.log(np.array([[unsure, confident, confident]] * 20 + [[confident, confident, confident]] * 20))
    gold = np.array([1] * 20 + [0] * 20)  # unsure layer-0 rows predict 0 but gold is 1 -> wrong
    logits[:20, 1:] = np.log(np.array([0.1, 0.9]))  # their later layers are confidently right
    svm = fit_adainfer(ExitRecords(gold, logits.astype(np.float32)))
    assert adainfer_exit_layers(svm, logits[[0, 20]], None).tolist() == [1, 0]


def test_adainfer_trains_on_vocabulary_features_when_the_records_hold_them():
    # label-word probabilities say nothing (always 0.6); the vocabulary's gap says which layers are right
    n = 60
    gold = np.zeros(n, dtype=int)
    right = np.array([[False, True, True]] * n)
    logits = np.where(right[..., None], np.log([0.6, 0.4]), np.log([0.4, 0.6])).astype(np.float32)
    vocab = np.where(right[..., None], [0.5, 0.1], [0.3, 0.28]).astype(np.float32)
    svm = fit_adainfer(ExitRecords(gold, logits, vocab))
    assert adainfer_exit_layers(svm, logits[:2], vocab[:2]).tolist() == [1, 1]
