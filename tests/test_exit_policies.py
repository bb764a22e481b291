"""Every compared exit policy on hand-computed cases, and scored exits against real online runs on a tiny model."""

from __future__ import annotations

import json

import numpy as np
import pytest

from raee.build import build_store
from raee.data import read_examples
from raee.engine import Engine
from raee.errors import InputError
from raee.evaluation import Evaluator, choose_earliest_ratio, default_policies, leave_one_out_view
from raee.exit_policies import (LinearSVM, PolicySuite, QueryView, calibrate_confidence, first_stop, head_features,
                                parse)
from raee.keys import KeySpec
from raee.policy import RaeeConfig
from raee.records import ExitRecords
from raee.store import load_store
from raee.tasks import BUILTIN_TASKS
from tests.conftest import tiny_backbone

TASK = BUILTIN_TASKS["sst2"]


def logits_for(probabilities) -> np.ndarray:
    return np.log(np.asarray(probabilities, dtype=np.float64))


def test_head_features_are_gap_and_top_probability():
    features = head_features(logits_for([[0.7, 0.2, 0.1], [0.4, 0.35, 0.25]]))
    np.testing.assert_allclose(features, [[0.5, 0.7], [0.05, 0.4]], atol=1e-9)


def test_oracle_full_and_static():
    # 3 items, layers 0..2, 2 labels; gold 1, 0, 1
    logits = logits_for([[[0.9, 0.1], [0.4, 0.6], [0.3, 0.7]],   # right first at layer 1
                         [[0.8, 0.2], [0.3, 0.7], [0.6, 0.4]],   # right at 0
                         [[0.9, 0.1], [0.8, 0.2], [0.7, 0.3]]])  # never right -> full depth
    view = QueryView(logits, np.zeros((3, 1)), np.zeros((3, 1), dtype=int), np.array([1, 0, 1]))
    suite = PolicySuite(ExitRecords(np.array([0]), logits[:1].astype(np.float32)), RaeeConfig())
    assert suite.exit_layers(suite.spec("oracle"), view).tolist() == [1, 0, 2]
    assert suite.exit_layers(suite.spec("full"), view).tolist() == [2, 2, 2]
    assert suite.exit_layers(suite.spec("static:1"), view).tolist() == [1, 1, 1]
    with pytest.raises(InputError, match="gold"):
        suite.exit_layers(suite.spec("oracle"), QueryView(logits, view.similarities, view.neighbour_ids))


def test_confidence_thresholds_hand_computed():
    # 10 calibration items, 1 layer + full. Layer-0 confidences 0.95, 0.9, ..., 0.5; the full-depth prediction is
    # label 0 for all; layer 0 predicts label 0 except for the items of confidence 0.85 and 0.6.
    top = np.array([0.95, 0.9, 0.85, 0.8, 0.75, 0.7, 0.65, 0.6, 0.55, 0.5])
    layer0 = np.stack([top, 1 - top], axis=1)
    layer0[[2, 7]] = layer0[[2, 7]][:, ::-1]
    full = np.tile([0.9, 0.1], (10, 1))
    records = ExitRecords(np.zeros(10, dtype=int), np.log(np.stack([layer0, full], axis=1)).astype(np.float32))
    # agreement of the n most confident: 1, 1, 2/3, 3/4, 4/5, 5/6, 6/7, 6/8, 7/9, 8/10
    # target 0.85: the largest n with rate >= 0.85 is n = 7 (6/7 = 0.857): threshold = 7th confidence = 0.65
    np.testing.assert_allclose(calibrate_confidence(records, 0.85, holdout=1.0), [0.65, 0.0])
    # target 0.8: all ten qualify (8/10 = 0.8): threshold = the lowest confidence, 0.5
    np.testing.assert_allclose(calibrate_confidence(records, 0.8, holdout=1.0), [0.5, 0.0])
    np.testing.assert_allclose(calibrate_confidence(records, 0.99, holdout=1.0), [0.9, 0.0])
    suite = PolicySuite(records, RaeeConfig())
    suite._thresholds[0.85] = calibrate_confidence(records, 0.85, holdout=1.0)
    queries = np.log(np.array([[[0.7, 0.3], [0.9, 0.1]], [[0.6, 0.4], [0.9, 0.1]]]))
    view = QueryView(queries, np.zeros((2, 1)), np.zeros((2, 1), dtype=int))
    assert suite.exit_layers(suite.spec("confidence:0.85"), view).tolist() == [0, 1]


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
    suite = PolicySuite(ExitRecords(gold, logits.astype(np.float32)), RaeeConfig())
    view = QueryView(logits[[0, 20]], np.zeros((2, 1)), np.zeros((2, 1), dtype=int))
    assert suite.exit_layers(suite.spec("adainfer"), view).tolist() == [1, 0]


def test_policy_names():
    config = RaeeConfig()
    assert parse("raee-k:4", 6, config).raee.k == 4
    assert parse("raee-no-tau", 6, config).raee.use_tau is False
    assert parse("raee-earliest:0.7", 6, config).raee.earliest_ratio == 0.7
    assert parse("confidence", 6, config).rate == 0.95 and parse("confidence:0.9", 6, config).rate == 0.9
    for bad in ("static:7", "raee-k:x", "confidence:2", "raee-earliest:", "fast"):
        with pytest.raises(InputError, match="is not one of"):
            parse(bad, 6, config)
    assert len(default_policies(6)) == 1 + 5 + 1 + 2 + 4 + 7 + 2


@pytest.fixture(scope="module")
def engine(sst2_like, tmp_path_factory):
    backbone = tiny_backbone("bert-encoder")
    out = tmp_path_factory.mktemp("eval") / "store"
    build_store(out, TASK, backbone, read_examples(sst2_like, TASK)[:160], key=KeySpec("prefix", 1), progress=False)
    return Engine(load_store(out), backbone)


@pytest.fixture(scope="module")
def evaluator(engine, sst2_like):
    return Evaluator(engine, read_examples(sst2_like, TASK)[160:], progress=False)


@pytest.mark.parametrize("name", ["raee", "raee-k:4", "raee-earliest:0.5", "raee-no-tau", "full", "static:2"])
def test_scored_exits_match_the_engine(evaluator, engine, name):
    spec, score, exits = evaluator.score(name)
    texts = [e.text for e in evaluator.examples]
    kwargs = {"raee": spec.raee} if spec.kind == "raee" else {"policy": name}
    results = engine.classify(texts, **kwargs)
    assert [r.exit_layer for r in results] == exits.tolist()
    gold = np.array([e.label for e in evaluator.examples])
    assert np.mean(np.array([r.label_index for r in results]) == gold) == pytest.approx(score)


@pytest.mark.parametrize("name", ["adainfer", "confidence"])
def test_head_reading_policies_online_match_scored(evaluator, engine, name):
    spec, _, exits = evaluator.score(name)
    texts = [e.text for e in evaluator.examples]
    run = evaluator._runner(spec, exits)
    calls = [0] * engine.num_layers
    hooks = [layer.register_forward_hook(lambda _m, a, _o, i=i: calls.__setitem__(i, calls[i] + a[0].shape[0]))
             for i, layer in enumerate(engine.backbone.layers)]
    try:
        logits, online_exits = run(texts, slice(0, len(texts)))
    finally:
        for h in hooks:
            h.remove()
    assert online_exits.tolist() == exits.tolist()
    assert calls == [int((exits > i).sum()) for i in range(engine.num_layers)]
    expected = evaluator.view.label_logits[np.arange(len(exits)), exits].argmax(axis=1)
    assert logits.argmax(dim=1).tolist() == expected.tolist()


def test_results_carry_real_timings(evaluator):
    result = evaluator.evaluate("raee", timing_sample=10)
    assert result.latency_ms_p50 > 0 and result.throughput_per_s > 0
    assert 0 <= result.layers_saved <= 1 and result.avg_layers_run >= 1  # prefix:1 runs at least one layer


def test_leave_one_out_never_retrieves_the_item_itself(engine):
    view = leave_one_out_view(engine.store)
    assert not (view.neighbour_ids == np.arange(len(view.neighbour_ids))[:, None]).any()
    ratio, curve = choose_earliest_ratio(engine.store, depth_budget=0.7)
    assert ratio in [c[0] for c in curve]
    inside = [c for c in curve if c[2] <= 0.7 * 3]
    if inside:
        assert dict((c[0], c[1]) for c in curve)[ratio] == max(c[1] for c in inside)


def test_raee_eval_suite_cli(sst2_like, tmp_path, capsys):
    from indexer.evaluate import main
    from raee.backbones import load_backbone
    from tests.conftest import save_checkpoint
    backbone = load_backbone(str(save_checkpoint("bert-mlm", tmp_path / "ckpt")))
    store = str(tmp_path / "store")
    build_store(store, TASK, backbone, read_examples(sst2_like, TASK), key=KeySpec("prefix", 1), progress=False)
    args = ["--store", store, "--test", str(sst2_like), "--store", store, "--test", str(sst2_like), "--suite",
            "--limit", "30", "--timing-sample", "5", "--json", str(tmp_path / "r.json"),
            "--plot", str(tmp_path / "p.png"), "--no-progress", "--policies", "full,raee,oracle,raee-earliest:auto"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "| policy | score | avg exit layer |" in out and "avg score" in out
    figures = json.loads((tmp_path / "r.json").read_text())
    task = figures["tasks"][0]
    assert task["n"] == 30 and set(task["policies"]) == {"full", "raee", "oracle", "raee-earliest:auto"}
    for entry in task["policies"].values():
        assert {"metric", "score", "avg_exit_layer", "latency_ms_p50", "throughput_per_s"} <= set(entry)
    assert (tmp_path / "p-sst2.png").exists()


def test_policies_work_on_a_store_smaller_than_k(tmp_path):
    from raee.index import IndexSpec, build_index
    from raee.store import write_store
    rng = np.random.default_rng(0)
    n = 20
    keys = rng.normal(size=(n, 8)).astype(np.float32)
    keys /= np.linalg.norm(keys, axis=1, keepdims=True)
    records = ExitRecords(rng.integers(0, 2, n), rng.normal(size=(n, 4, 2)).astype(np.float32))
    from raee.manifest import BackboneIdentity, StoreManifest
    manifest = StoreManifest(task=TASK, backbone=BackboneIdentity("tiny", "masked-lm", 3, "f" * 32, "float32"),
                             embedder=None, key=KeySpec("prefix", 1), key_dim=8, num_layers=3, num_items=n,
                             num_labels=2, index=IndexSpec(), policy=RaeeConfig())
    write_store(tmp_path / "s", manifest, records, build_index(keys, IndexSpec()), [str(i) for i in range(n)],
                np.arange(n))
    store = load_store(tmp_path / "s")
    view = leave_one_out_view(store)  # 21 columns retrieved, one dropped
    assert view.neighbour_ids.shape == (n, n - 1)
    assert not (view.neighbour_ids == np.arange(n)[:, None]).any()
    suite = PolicySuite(store.records, store.policy)
    assert suite.exit_layers(suite.spec("raee-k:32"), view).shape == (n,)
    choose_earliest_ratio(store, 0.7)


def test_evaluation_skips_test_items_the_backbone_cannot_read(engine, sst2_like, caplog):
    from raee.data import Example
    examples = read_examples(sst2_like, TASK)[160:170]
    unreadable = [Example("good " * 100, 1, 998), Example("x" * 10_000, 0, 999)]  # too many tokens; too many characters
    evaluator = Evaluator(engine, [*examples, *unreadable], progress=False)
    assert len(evaluator.examples) == 10 and "998, 999" in caplog.text
