"""Build-time calibration on synthetic records: leave-one-out neighbours, match-full's choice against a brute-force
replay of the procedure, best's choice, the faithful objective, and the store round trip."""

from __future__ import annotations

import dataclasses
from statistics import NormalDist

import numpy as np
import pytest

from raee.accuracy_rule import AccuracyRuleConfig, accuracy_exit_layers, estimated_accuracy
from raee.build import CalibrationPass, calibrate_items, calibration_settings, check_key_choice, choose_key
from raee.calibration import (
    BEST_STRUCTURES,
    COSTS,
    EARLIEST_RATIOS,
    MARGINS,
    SEARCH_WIDTH,
    CalibratedPolicy,
    CalibrationSettings,
    KeyTrial,
    best_within_budget,
    calibrate,
    calibration_estimate,
)
from raee.data import text_groups
from raee.errors import InputError
from raee.guarantee import GAMMA_SHARE, certified_within_budget, risk_pvalue
from raee.index import IndexSpec, build_index, keys_of, leave_one_out_search, search
from raee.keys import KeySpec, parse_key_choice
from raee.metrics import task_score
from raee.raee_rule import RaeeConfig, raee_exit_layers
from raee.records import ExitRecords


def synthetic_store(n=600, layers=4, seed=0):
    """Items in 6 clusters of keys; in cluster c, layer c % 4 tends to be right and full depth is right 60% of the
    time, and most items share the cluster's label: neighbours carry real evidence about where to exit, in their
    records and in their labels (what key_layers=votes reads)."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(6, 16))
    cluster = rng.integers(0, 6, n)
    keys = centres[cluster] + 0.6 * rng.normal(size=(n, 16))
    keys = (keys / np.linalg.norm(keys, axis=1, keepdims=True)).astype(np.float32)
    gold = np.where(rng.random(n) < 0.8, cluster % 2, 1 - cluster % 2)
    right = rng.random((n, layers + 1)) < 0.45
    right[np.arange(n), cluster % layers] = rng.random(n) < 0.9
    right[:, layers] = rng.random(n) < 0.6
    predicted = np.where(right, gold[:, None], 1 - gold[:, None])
    confidence = rng.uniform(1, 3, (n, layers + 1))
    logits = np.stack([np.where(predicted == 0, confidence, 0), np.where(predicted == 1, confidence, 0)], axis=-1)
    return ExitRecords(gold, logits.astype(np.float32)), build_index(keys, IndexSpec()), [f"t{i}" for i in range(n)]


@pytest.fixture(scope="module")
def store():
    records, index, texts = synthetic_store()
    sims, ids = leave_one_out_search(index, text_groups(texts), SEARCH_WIDTH)
    return records, index, texts, sims, ids


def test_leave_one_out_never_retrieves_the_item_or_its_twins():
    records, index, texts = synthetic_store(n=50)
    texts = [*texts[:40], *["same"] * 10]  # ten items of one text
    sims, ids = leave_one_out_search(index, text_groups(texts), 45)
    groups = text_groups(texts)
    assert ids.shape == (50, 45)
    for i in range(50):
        found = ids[i][ids[i] >= 0]
        assert i not in found and not (groups[found] == groups[i]).any()
        assert np.all(np.diff(sims[i][ids[i] >= 0]) <= 1e-5)  # closest first (ties within 1e-5 go by id)
    assert (ids[45] >= 0).sum() == 40  # the twins' rows keep only the 40 other items


def test_search_breaks_ties_by_id():
    keys = np.tile(np.eye(4, dtype=np.float32)[:1], (6, 1))  # six identical keys
    index = build_index(keys, IndexSpec())
    _, ids = search(index, keys[:2], 4)
    assert ids.tolist() == [[0, 1, 2, 3], [0, 1, 2, 3]]


def rule_exits(records, sims, ids, rule, key_layer=1):
    """The accuracy rule's exits for calibration items, leave-one-out: their own predictions at layers 0..K given
    for votes, and each item's store means taken without it."""
    values, labels, n = records.record_values(rule.values), records.gold_one_hot, records.num_items
    return accuracy_exit_layers(sims, ids, values, rule, key_layer, (values.sum(axis=0) - values) / (n - 1),
                                labels=labels, predicted=records.predicted[:, :key_layer + 1],
                                label_mean=(labels.sum(axis=0) - labels) / (n - 1))


@pytest.mark.parametrize("key_layers", ["votes", "records"])
def test_no_item_s_own_label_or_record_enters_its_calibration_estimate(store, key_layers):
    records, _, _, sims, ids = store
    structure = AccuracyRuleConfig(key_layers=key_layers)
    before = calibration_estimate(records, sims, ids, structure, 1)
    flipped = ExitRecords(records.gold.copy(), records.label_logits.copy())
    flipped.gold[0] = 1 - flipped.gold[0]  # item 0's label, and so its right/wrong record at every layer
    after = calibration_estimate(flipped, sims, ids, structure, 1)
    np.testing.assert_array_equal(after[0], before[0])
    assert not np.array_equal(after[1:], before[1:])  # the others see it (as a neighbour or in their means)


def brute_force_match_full(records, sims, ids, settings, key_layers):
    """The procedure of raee/calibration.py, replayed step by step without a gate: exits of each setting on the
    documented path, losses counted item by item, each setting tested in turn until the first failure."""
    n, num_layers = records.num_items, records.num_layers
    path = ([AccuracyRuleConfig(margin=m, key_layers=key_layers) for m in MARGINS] +
            [AccuracyRuleConfig(cost=c, key_layers=key_layers) for c in COSTS])
    chosen, predicted = -1, records.predicted
    for i, rule in enumerate(path):
        exits = rule_exits(records, sims, ids, rule)
        harms = helps = 0
        for item in range(n):
            full_right = predicted[item, num_layers] == records.gold[item]
            exit_right = predicted[item, exits[item]] == records.gold[item]
            harms += full_right and not exit_right
            helps += exit_right and not full_right
        if risk_pvalue(harms, helps, n, settings.epsilon, GAMMA_SHARE * settings.delta) > settings.delta:
            break
        if settings.query_items:  # the file-level claim: calibration mean plus the scatter of both samples
            scatter = ((harms + helps + 1) / (n + 1) * (1 / n + 1 / settings.query_items)) ** 0.5
            if (harms - helps) / n + NormalDist().inv_cdf(1 - settings.delta) * scatter > settings.epsilon:
                break
        chosen = i
    return path[chosen] if chosen >= 0 else None, chosen


@pytest.mark.slow
@pytest.mark.parametrize("epsilon", [0.02, 0.05])
@pytest.mark.parametrize("key_layers", ["votes", "records"])
@pytest.mark.parametrize("query_items", [0, 500])
def test_match_full_chooses_what_the_procedure_replayed_by_hand_chooses(store, epsilon, key_layers, query_items):
    records, _, _, sims, ids = store
    settings = CalibrationSettings(epsilon=epsilon, gate_alpha=0, stream_p=0, key_layers=key_layers,
                                   query_items=query_items)
    policy, evidence = calibrate(records, sims, ids, key_layer=1, metric="accuracy", raee=RaeeConfig(),
                                 settings=settings)
    expected, index = brute_force_match_full(records, sims, ids, settings, key_layers)
    assert policy.rule == expected and evidence.chosen == index and policy.gate is None
    assert index > 0  # the synthetic evidence lets it leave full depth
    chosen = evidence.curve[index]
    assert chosen.accepted and all(p.accepted for p in evidence.curve[:index])
    assert index + 1 == len(evidence.curve) or not evidence.curve[index + 1].accepted
    exits = rule_exits(records, sims, ids, expected)
    assert chosen.accuracy == pytest.approx(np.mean(records.correct[np.arange(len(exits)), exits]))
    assert chosen.layers_run == pytest.approx(np.maximum(exits, 1).mean() / records.num_layers)
    assert chosen.risk_bound <= epsilon + 1e-9  # it passed, so its bound is within epsilon
    assert evidence.full_accuracy == pytest.approx(records.correct[:, -1].mean())


def test_match_full_gate_is_calibrated_on_the_items_and_covered_by_the_test(store):
    records, _, _, sims, ids = store
    policy, evidence = calibrate(records, sims, ids, key_layer=1, metric="accuracy", raee=RaeeConfig(),
                                 settings=CalibrationSettings(epsilon=0.02, gate_alpha=0.1))
    gate, chosen = policy.gate, evidence.curve[evidence.chosen]
    assert gate.min_similarity == pytest.approx(np.quantile(sims[:, 0], 0.05))
    agreement = estimated_accuracy(sims, ids, records.record_values("correct"), AccuracyRuleConfig(), prior=False)
    exits = rule_exits(records, sims, ids, policy.rule)
    at_exit = agreement[np.arange(len(exits)), exits]
    assert gate.min_agreement == pytest.approx(np.quantile(at_exit, 0.05))
    flagged = (sims[:, 0] < gate.min_similarity) | (at_exit < gate.min_agreement)
    assert chosen.off_domain == pytest.approx(flagged.mean()) and 0.05 <= flagged.mean() <= 0.1
    served = np.where(flagged, records.num_layers, exits)
    assert chosen.accuracy == pytest.approx(records.correct[np.arange(len(served)), served].mean())


def test_best_takes_the_top_calibration_score_within_the_budget(store):
    records, _, _, sims, ids = store
    settings = CalibrationSettings(objective="best", depth_budget=0.5, gate_alpha=0, stream_p=0, key_layers="votes")
    policy, evidence = calibrate(records, sims, ids, key_layer=1, metric="accuracy", raee=RaeeConfig(),
                                 settings=settings)
    chosen = evidence.curve[evidence.chosen]
    assert chosen.layers_run <= 0.5 and chosen.accepted
    certified = [p.accepted for p in evidence.curve]
    assert any(certified) and not all(certified), "the served path should hold both kinds of setting"
    first = certified.index(True)  # the certified settings are the path's cheap end, from the first certified on
    assert all(certified[first:]) and not any(certified[:first])
    rule = policy.rule
    assert not isinstance(rule, AccuracyRuleConfig) or rule.key_layers == "votes"  # every structure as settings say
    exits = (rule_exits(records, sims, ids, rule) if isinstance(rule, AccuracyRuleConfig) else
             raee_exit_layers(sims, ids, records.record_probability(), rule))
    assert chosen.score == pytest.approx(task_score("accuracy", records.predicted[np.arange(len(exits)), exits],
                                                    records.gold))
    # no point of the raee-earliest path certified within the budget (tested from its cheapest end at delta over
    # the number of paths) scores higher
    probability = records.record_probability()
    path = [raee_exit_layers(sims, ids, probability, RaeeConfig(earliest_ratio=ratio)) for ratio in EARLIEST_RATIOS]
    shares = [np.maximum(e, 1) / records.num_layers for e in path]
    count = certified_within_budget(reversed(shares), 0.5, settings.delta / (len(BEST_STRUCTURES) + 1))
    inside = path[len(path) - count:]
    assert inside, "no raee-earliest point within the budget: the comparison below would check nothing"
    assert all(s.mean() <= 0.5 for s in shares[len(path) - count:])
    assert max(np.mean(records.correct[np.arange(len(e)), e]) for e in inside) <= chosen.score + 1e-12


def test_best_within_budget_rule():
    certified = [True, True, True, False]
    assert best_within_budget([0.7, 0.8, 0.8, 0.9], [0.3, 0.5, 0.4, 0.55], certified) == 2  # tie: fewer layers
    assert best_within_budget([0.7, 0.9], [0.8, 0.9], [False, False]) == 0  # none certified: the fewest layers


def test_raee_objective_serves_faithful_raee(store):
    records, _, _, sims, ids = store
    raee = RaeeConfig(k=8, tau=0.8)
    policy, evidence = calibrate(records, sims, ids, key_layer=1, metric="accuracy", raee=raee,
                                 settings=CalibrationSettings(objective="raee"))
    assert policy.rule == raee and policy.gate is None and evidence.curve[evidence.chosen].off_domain == 0
    assert policy.name == "raee:earliest_ratio=1,fallback_top=3,k=8,tau=0.8,use_tau=true,weights=squared"


def test_calibrated_policy_round_trips(store):
    records, _, _, sims, ids = store
    policy, evidence = calibrate(records, sims, ids, key_layer=1, metric="accuracy", raee=RaeeConfig(),
                                 settings=CalibrationSettings(epsilon=0.02))
    assert policy.gate is not None and CalibratedPolicy.from_dict(policy.to_dict()) == policy
    assert type(evidence).from_dict(evidence.to_dict()) == evidence
    full = dataclasses.replace(policy, rule=None, gate=None)
    assert CalibratedPolicy.from_dict(full.to_dict()).name == "full"


@pytest.mark.slow
def test_small_calibration_sets_cannot_certify_a_tiny_epsilon(store):
    records, _, _, sims, ids = store
    policy, evidence = calibrate(records, sims, ids, key_layer=1, metric="accuracy", raee=RaeeConfig(),
                                 settings=CalibrationSettings(epsilon=0.005))
    # 600 items cannot show a risk below 0.5 point even for a setting identical to full depth: full depth is served
    assert policy.rule is None and evidence.chosen == -1 and policy.name == "full"


@pytest.mark.parametrize("bad", [dict(objective="fast"), dict(epsilon=1.5), dict(delta=0), dict(depth_budget=0),
                                 dict(gate_alpha=0.6), dict(stream_p=1), dict(key_layers="labels"),
                                 dict(query_items=-1)])
def test_bad_settings_are_refused(bad):
    with pytest.raises(InputError):
        CalibrationSettings(**bad)


def test_settings_saved_before_votes_read_the_key_layers_by_records():
    saved = CalibrationSettings().to_dict()
    del saved["key_layers"]  # a store built before the votes
    assert CalibrationSettings.from_dict(saved).key_layers == "records"


def test_settings_saved_before_the_file_level_claim_make_none_and_new_ones_keep_theirs():
    saved = CalibrationSettings().to_dict()
    assert CalibrationSettings.from_dict(saved).query_items == 2000  # the build's default, saved and read back
    del saved["query_items"]  # a store built before it: recalibrating it reproduces what it was built with
    assert CalibrationSettings.from_dict(saved).query_items == 0


def test_match_full_on_a_file_is_more_cautious_than_in_expectation_and_says_so(store):
    from indexer.summary import calibration_summary
    records, _, _, sims, ids = store
    chosen = {}
    for items in (0, 20):  # the synthetic store's exits beat full depth by 14 points: only a tiny file scatters enough
        settings = CalibrationSettings(epsilon=0.02, gate_alpha=0, stream_p=0, query_items=items)
        policy, evidence = calibrate(records, sims, ids, key_layer=1, metric="accuracy", raee=RaeeConfig(),
                                     settings=settings)
        chosen[items] = evidence.chosen

        class Store:  # what calibration_summary reads
            calibrated_policy = policy
            key = "prefix:1"
        text = calibration_summary(Store(), evidence)  # type: ignore[arg-type]
        assert ("also as measured on a file of 20 queries" if items else "in expectation") in text
        assert ("on a file of 20 queries, at most" in text) == bool(items)
    assert 0 < chosen[20] < chosen[0]  # the file's scatter stops the sequence sooner, but not at once


def two_key_pass(informative_layer=1):
    """A calibration pass with prefix keys at layers 1 and 2: one layer's keys carry the clusters the records
    follow, the other's are noise, so neighbours by it say little about where to exit."""
    records, index, texts = synthetic_store()
    informative = keys_of(index)
    noise = np.random.default_rng(9).normal(size=informative.shape)
    noise = (noise / np.linalg.norm(noise, axis=1, keepdims=True)).astype(np.float32)
    pooled = {informative_layer: informative, 3 - informative_layer: noise}
    return CalibrationPass(records, noise, texts, np.arange(len(texts)), 1.0, pooled)


@pytest.mark.parametrize("objective", ["match-full", "best"])
def test_a_build_chooses_its_key_by_the_objective_at_delta_over_the_keys(objective):
    calibration = two_key_pass()
    settings = CalibrationSettings(objective=objective)
    keys = (KeySpec("prefix", 1), KeySpec("prefix", 2))
    key, index, (policy, evidence) = choose_key(calibration, keys, "accuracy", RaeeConfig(), settings, IndexSpec())
    assert [k.key for k in evidence.keys] == ["prefix:1", "prefix:2"]
    assert all(k.delta == pytest.approx(0.05) for k in evidence.keys)
    # each key's trial is that key's own calibration at delta / 2, redone here
    half = dataclasses.replace(settings, delta=0.05)
    for spec, trial in zip(keys, evidence.keys):
        alone, alone_evidence = calibrate_items(calibration.records, build_index(calibration.pooled[spec.layer],
                                                                                 IndexSpec()),
                                                calibration.texts, spec, "accuracy", RaeeConfig(), half)
        assert trial.policy == alone.name
        if spec == key:  # what the store is written with is the chosen key's own index, policy and evidence
            assert np.array_equal(keys_of(index), calibration.pooled[spec.layer])
            assert policy.name == alone.name and evidence.curve == alone_evidence.curve
        point = alone_evidence.curve[alone_evidence.chosen] if alone_evidence.chosen >= 0 else None
        expected = (point.score, point.layers_run) if point else (alone_evidence.full_score, 1.0)  # full depth
        assert (trial.score, trial.layers_run) == pytest.approx(expected)
    by_layers = min(evidence.keys, key=lambda k: k.layers_run)
    by_score = max(evidence.keys, key=lambda k: k.score)
    assert str(key) == (by_layers if objective == "match-full" else by_score).key
    assert str(key) == "prefix:1", "the informative key should win either way: the test would then check nothing"
    assert policy.settings == settings  # the build's delta kept; the evidence says it was tested at delta / 2
    assert type(evidence).from_dict(evidence.to_dict()) == evidence and evidence.keys_tried == 2


def test_best_prefers_a_key_certified_within_the_budget():
    """prefix:2 is informative but runs at least half of the 4 layers, so a 45% budget certifies none of its
    settings, whatever it scores; prefix:1 (noise) has certified settings and must be kept."""
    calibration = two_key_pass(informative_layer=2)
    settings = CalibrationSettings(objective="best", depth_budget=0.45, gate_alpha=0, stream_p=0)
    key, _, (_, evidence) = choose_key(calibration, (KeySpec("prefix", 1), KeySpec("prefix", 2)), "accuracy",
                                       RaeeConfig(), settings, IndexSpec())
    by_key = {k.key: k for k in evidence.keys}
    assert by_key["prefix:1"].certified and not by_key["prefix:2"].certified
    assert str(key) == "prefix:1" and evidence.curve[evidence.chosen].accepted


def test_a_store_that_chose_its_key_is_calibrated_again_at_the_same_level(store):
    records, _, _, sims, ids = store
    _, plain = calibrate(records, sims, ids, key_layer=1, metric="accuracy", raee=RaeeConfig(),
                         settings=CalibrationSettings())
    assert "keys" not in plain.to_dict() and plain.keys_tried == 1  # older readers refuse an unknown field
    chose = dataclasses.replace(plain, keys=(KeyTrial("prefix:1", "full", 0.5, 1.0, 0.05),
                                             KeyTrial("prefix:2", "full", 0.5, 1.0, 0.05)))

    class Manifest:
        calibration_settings = CalibrationSettings(delta=0.1)
        calibration_evidence = chose
    assert calibration_settings(Manifest()).delta == pytest.approx(0.05)  # type: ignore[arg-type]
    Manifest.calibration_evidence = plain
    assert calibration_settings(Manifest()).delta == pytest.approx(0.1)  # type: ignore[arg-type]


def test_key_choices_parse_and_refuse():
    assert parse_key_choice("auto") == (KeySpec("prefix", 1), KeySpec("prefix", 2))
    assert parse_key_choice("auto:3,0,3") == (KeySpec("prefix", 0), KeySpec("prefix", 3))
    assert parse_key_choice("prefix:2") == (KeySpec("prefix", 2),)
    for bad in ("auto:1", "auto:x", "auto:1,-2", "auto:", "prefix"):
        with pytest.raises(InputError):
            parse_key_choice(bad)
    with pytest.raises(InputError, match="shard"):
        check_key_choice(parse_key_choice("auto"), (0, 2))
    with pytest.raises(InputError, match="prefix keys"):
        check_key_choice((KeySpec("embedder"), KeySpec("prefix", 1)), None)
    check_key_choice((KeySpec("prefix", 2),), (0, 2))  # one key: a shard may


def test_best_certifies_each_path_at_delta_over_the_paths(store, monkeypatch):
    import raee.calibration
    records, _, _, sims, ids = store
    levels = []
    real = raee.calibration.certified_within_budget

    def spy(shares, budget, alpha):
        levels.append(alpha)
        return real(shares, budget, alpha)
    monkeypatch.setattr(raee.calibration, "certified_within_budget", spy)
    calibrate(records, sims, ids, key_layer=1, metric="accuracy", raee=RaeeConfig(),
              settings=CalibrationSettings(objective="best", delta=0.09, gate_alpha=0, stream_p=0))
    assert levels == [pytest.approx(0.01)] * (len(BEST_STRUCTURES) + 1)


def test_best_with_every_layer_as_budget_takes_the_top_score(store):
    records, _, _, sims, ids = store
    settings = CalibrationSettings(objective="best", depth_budget=1.0, gate_alpha=0, stream_p=0)
    _, evidence = calibrate(records, sims, ids, key_layer=1, metric="accuracy", raee=RaeeConfig(),
                            settings=settings)
    assert all(p.accepted for p in evidence.curve)  # a budget of 1 holds for every setting
    narrower = CalibrationSettings(objective="best", depth_budget=0.999, gate_alpha=0, stream_p=0)
    _, near = calibrate(records, sims, ids, key_layer=1, metric="accuracy", raee=RaeeConfig(),
                        settings=narrower)
    assert evidence.curve[evidence.chosen].score >= near.curve[near.chosen].score


def test_best_says_when_no_setting_is_certified(store, tmp_path):
    from indexer.summary import calibration_summary
    records, _, _, sims, ids = store
    settings = CalibrationSettings(objective="best", depth_budget=0.2, gate_alpha=0, stream_p=0)  # below layer 1
    policy, evidence = calibrate(records, sims, ids, key_layer=1, metric="accuracy", raee=RaeeConfig(),
                                 settings=settings)
    assert not any(p.accepted for p in evidence.curve) and evidence.chosen >= 0

    class Store:  # what calibration_summary reads
        calibrated_policy = policy
        key = "prefix:1"
    text = calibration_summary(Store(), evidence)  # type: ignore[arg-type]
    assert "NO setting was certified" in text and "WITHOUT the guarantee" in text
    old = dataclasses.replace(evidence, curve=tuple(dataclasses.replace(p, accepted=None) for p in evidence.curve))
    assert "built before budgets were certified" in calibration_summary(Store(), old)  # type: ignore[arg-type]


def test_search_orders_as_sorting_by_similarity_then_id_with_or_without_ties():
    """A batch with no tie takes FAISS's order as it comes (no sort); one with a tie is sorted; either way the
    result is the (-similarity to TIE_DECIMALS, id) order over the fetched neighbours."""
    from raee.index import TIE_DECIMALS, TIE_MARGIN

    rng = np.random.default_rng(3)
    keys = rng.normal(size=(300, 16)).astype(np.float32)
    keys /= np.linalg.norm(keys, axis=1, keepdims=True)
    keys[200:210] = keys[5]  # ten twins of item 5: a query near it ties at the top
    index = build_index(keys, IndexSpec("flat"))
    for queries in (keys[[20, 40, 60]] + 0.01, keys[[5, 20]]):
        sims, ids = search(index, queries, 12)
        raw_sims, raw_ids = index.search(np.ascontiguousarray(queries), 12 + TIE_MARGIN)
        for row in range(len(queries)):
            expected = sorted(zip(-np.round(raw_sims[row].astype(np.float64), TIE_DECIMALS), raw_ids[row]))[:12]
            assert ids[row].tolist() == [int(i) for _, i in expected]
    assert ids[0].tolist()[:11] == [5, *range(200, 210)]  # the twins by id after item 5
