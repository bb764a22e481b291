"""raee-eval's scoring against real online runs on a tiny model: retrieval exits equal the engine's, head-reading
policies online equal their scored exits, search is as wide as the widest policy, unseen-only scores, guarantees."""

from __future__ import annotations

import json

import numpy as np
import pytest

from raee.build import build_store
from raee.data import Example, read_examples
from raee.engine import Engine
from raee.evaluation import Evaluator
from raee.exit_policy import ExitPolicy
from raee.keys import KeySpec
from raee.store import load_store
from raee.tasks import BUILTIN_TASKS
from tests.tiny import synthetic_texts, tiny_backbone

TASK = BUILTIN_TASKS["sst2"]
POLICIES = ["calibrated", "calibrated:best", "raee", "raee:k=4", "raee:earliest_ratio=0.5", "raee:use_tau=false",
            "accuracy:cost=0.3", "accuracy:key_layers=votes,cost=0.3", "full", "static:2", "oracle", "adainfer",
            "confidence"]


@pytest.fixture(scope="module")
def store_dir(sst2_like, tmp_path_factory):
    out = tmp_path_factory.mktemp("eval") / "store"
    build_store(out, TASK, tiny_backbone("bert-encoder"), read_examples(sst2_like, TASK)[:160],
                key=KeySpec("prefix", 1), progress=False)
    return out


@pytest.fixture(scope="module")
def evaluator(store_dir, sst2_like):
    engine = Engine(load_store(store_dir), tiny_backbone("bert-encoder"))
    return Evaluator(engine, read_examples(sst2_like, TASK)[160:], POLICIES, progress=False)


@pytest.mark.parametrize("name", ["calibrated", "calibrated:best", "raee", "raee:k=4", "raee:earliest_ratio=0.5",
                                  "raee:use_tau=false", "accuracy:cost=0.3", "accuracy:key_layers=votes,cost=0.3",
                                  "full", "static:2"])
def test_scored_exits_match_a_fresh_engine(evaluator, store_dir, name):
    engine = Engine(load_store(store_dir), evaluator.engine.backbone)  # a fresh stream-test state, as the scoring
    exits, off_domain = evaluator.exits(ExitPolicy.parse(name))
    results = engine.classify([e.text for e in evaluator.examples], policy=name)
    assert [r.exit_layer for r in results] == exits.tolist()
    assert [r.off_domain for r in results] == off_domain.tolist()
    gold = np.array([e.label for e in evaluator.examples])
    assert np.mean(np.array([r.label_index for r in results]) == gold) == pytest.approx(evaluator.score(exits))


@pytest.mark.parametrize("name", ["adainfer", "confidence"])
def test_head_reading_policies_online_match_scored(evaluator, name):
    policy = ExitPolicy.parse(name)
    exits, _ = evaluator.exits(policy)
    engine = evaluator.engine
    texts = [e.text for e in evaluator.examples]
    calls = [0] * engine.num_layers
    hooks = [layer.register_forward_hook(lambda _m, a, _o, i=i: calls.__setitem__(i, calls[i] + a[0].shape[0]))
             for i, layer in enumerate(engine.backbone.layers)]
    try:
        logits, online_exits = evaluator.runner(policy, exits)(texts, slice(0, len(texts)))
    finally:
        for h in hooks:
            h.remove()
    assert online_exits.tolist() == exits.tolist()
    assert calls == [int((exits > i).sum()) for i in range(engine.num_layers)]
    expected = evaluator.view.label_logits[np.arange(len(exits)), exits].argmax(axis=1)
    assert logits.argmax(dim=1).tolist() == expected.tolist()


def test_search_is_as_wide_as_the_widest_policy(store_dir, sst2_like):
    engine = Engine(load_store(store_dir), tiny_backbone("bert-encoder"))
    examples = read_examples(sst2_like, TASK)[160:180]
    assert Evaluator(engine, examples, ["raee:k=100", "full"], progress=False).view.neighbour_ids.shape[1] == 100
    narrow = Evaluator(engine, examples, ["raee:k=3"], progress=False)
    assert narrow.view.neighbour_ids.shape[1] == 3
    wide = Evaluator(engine, examples, ["raee:k=150"], progress=False)  # a store of 160: up to 150 found
    exits, _ = wide.exits(ExitPolicy.parse("raee:k=150"))
    assert [r.exit_layer for r in engine.classify([e.text for e in examples], policy="raee:k=150")] == exits.tolist()


def test_results_carry_timings_guarantee_and_layers_run(evaluator):
    result = evaluator.evaluate("calibrated", timing_sample=10)
    assert result.latency_ms_p50 > 0 and result.throughput_per_s > 0
    assert result.guarantee == ("held" if result.accuracy >= result.accuracy_full - 0.005 - 1e-12 else "missed")
    raee = evaluator.evaluate("raee", timing_sample=0)
    exits, _ = evaluator.exits(ExitPolicy.parse("raee"))
    assert raee.avg_layers_run == pytest.approx(np.maximum(exits, 1).mean())  # prefix:1 counted
    assert raee.guarantee == "" and raee.latency_ms_p50 is None
    right = evaluator.view.label_logits[np.arange(len(exits)), exits].argmax(axis=1) == evaluator.view.gold
    full_right = evaluator.view.label_logits[:, -1].argmax(axis=1) == evaluator.view.gold
    assert (raee.helps, raee.harms) == (int((right & ~full_right).sum()), int((full_right & ~right).sum()))
    assert raee.accuracy - raee.accuracy_full == pytest.approx((raee.helps - raee.harms) / len(exits))
    static = evaluator.evaluate("static:0", timing_sample=0)
    assert static.avg_layers_run == 0  # fixed exits run no key
    best = evaluator.evaluate("calibrated:best", timing_sample=0)
    budget = evaluator.engine.calibrated("best").settings.depth_budget
    within = best.avg_layers_run / evaluator.engine.num_layers <= budget + 1e-12
    assert best.guarantee == ("held" if within else "missed")


def test_the_guarantee_verdict_on_both_sides_of_its_bound(evaluator):
    """match-full's claim: accuracy at most epsilon (0.5 point) below full depth's on this file; best's: layers run
    within its depth budget."""
    calibrated, bound = ExitPolicy.parse("calibrated"), evaluator.full_accuracy - 0.005
    assert evaluator.engine.store.calibrated_policy.settings.objective == "match-full"
    assert evaluator.guarantee(calibrated, bound, 1.0) == "held"
    assert evaluator.guarantee(calibrated, bound - 1e-6, 1.0) == "missed"
    assert evaluator.guarantee(calibrated, evaluator.full_accuracy, 1.0) == "held"
    best = ExitPolicy.parse("calibrated:best")  # best's guarantee is its depth budget, not accuracy
    budget = evaluator.engine.calibrated("best").settings.depth_budget
    assert evaluator.guarantee(best, 0.0, budget) == "held"
    assert evaluator.guarantee(best, 1.0, budget + 1e-6) == "missed"
    assert evaluator.guarantee(ExitPolicy.parse("calibrated:raee"), 0.0, 0.0) == ""  # faithful RAEE claims none
    assert evaluator.guarantee(ExitPolicy.parse("raee"), 0.0, 0.0) == ""


def test_unseen_only_scores_leave_out_texts_in_the_store(store_dir, sst2_like):
    engine = Engine(load_store(store_dir), tiny_backbone("bert-encoder"))
    examples = read_examples(sst2_like, TASK)
    mixed = [*examples[150:160], *examples[160:200]]  # ten texts the store holds
    evaluator = Evaluator(engine, mixed, ["raee"], progress=False)
    in_store = {e.text.strip() for e in examples[:160]}  # the store's texts, compared verbatim but for whitespace
    assert evaluator.view.seen.tolist() == [e.text.strip() in in_store for e in mixed]
    assert evaluator.view.seen[:10].all() and not evaluator.view.seen[10:].all()
    result = evaluator.evaluate("raee", timing_sample=0)
    exits, _ = evaluator.exits(ExitPolicy.parse("raee"))
    assert result.score_unseen == pytest.approx(evaluator.score(exits, ~evaluator.view.seen))


def test_evaluation_skips_test_items_the_backbone_cannot_read(store_dir, sst2_like, caplog):
    engine = Engine(load_store(store_dir), tiny_backbone("bert-encoder"))
    examples = read_examples(sst2_like, TASK)[160:170]
    unreadable = [Example("good " * 100, 1, 998), Example("x" * 10_000, 0, 999)]  # too many tokens; characters
    evaluator = Evaluator(engine, [*examples, *unreadable], ["raee"], progress=False)
    assert evaluator.examples == examples and "998, 999" in caplog.text and evaluator.truncated == 0


def test_evaluation_with_truncate_cuts_test_items_the_backbone_cannot_read(store_dir, sst2_like):
    engine = Engine(load_store(store_dir), tiny_backbone("bert-encoder"))
    examples = read_examples(sst2_like, TASK)[160:170]
    unreadable = [Example("good " * 100, 1, 998), Example("x" * 10_000, 0, 999)]  # too many tokens; characters
    evaluator = Evaluator(engine, [*examples, *unreadable], ["raee", "full"], progress=False, truncate=True)
    assert evaluator.truncated == 2 and evaluator.examples[:10] == examples
    assert [e.text for e in evaluator.examples[10:]] == engine.fit([e.text for e in unreadable])[0]
    full = engine.classify([e.text for e in unreadable], policy="full", truncate=True)
    assert evaluator.view.label_logits[10:, -1].argmax(axis=1).tolist() == [r.label_index for r in full]


@pytest.mark.slow
def test_raee_eval_truncate_flag_reports_the_items_cut(stores, tmp_path, capsys):
    from indexer.evaluate import main
    items = [*({"text": t, "label": y} for t, y in synthetic_texts(6, seed=5)),
             {"text": "good film " * 100, "label": "positive"}, {"text": "dull " * 3000, "label": "negative"}]
    test_file = tmp_path / "test.jsonl"
    test_file.write_text("".join(json.dumps(item) + "\n" for item in items))
    args = ["--store", stores["current"], "--test", str(test_file), "--policies", "full,raee", "--timing-sample", "0",
            "--no-progress", "--json", str(tmp_path / "r.json")]
    assert main(args) == 0
    assert "2 too long for the backbone, skipped" in capsys.readouterr().out
    figures = json.loads((tmp_path / "r.json").read_text())
    assert (figures["n"], figures["n_read"], figures["n_truncated"]) == (6, 8, 0)
    assert main([*args, "--truncate"]) == 0
    assert "2 too long for the backbone, cut to fit" in capsys.readouterr().out
    figures = json.loads((tmp_path / "r.json").read_text())
    assert (figures["n"], figures["n_read"], figures["n_truncated"]) == (8, 8, 2)


@pytest.mark.slow
def test_raee_eval_suite_and_cross_domain_cli(sst2_like, tmp_path, capsys):
    from indexer.evaluate import main
    from raee.backbones import load_backbone
    from tests.tiny import save_checkpoint
    backbone = load_backbone(str(save_checkpoint("bert-mlm", tmp_path / "ckpt")))
    store = str(tmp_path / "store")
    build_store(store, TASK, backbone, read_examples(sst2_like, TASK)[:120], key=KeySpec("prefix", 1),
                progress=False)
    args = ["--store", store, "--test", str(sst2_like), "--store", store, "--test", str(sst2_like), "--suite",
            "--cross-domain", "--limit", "30", "--timing-sample", "5", "--json", str(tmp_path / "r.json"),
            "--plot", str(tmp_path / "p.png"), "--no-progress",
            "--policies", "full,raee:k=4,tau=0.8,oracle,calibrated,calibrated:best,raee"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "| policy | score | unseen only |" in out and "avg score" in out and "Cross-domain" in out
    assert "raee:k=4,tau=0.8 (key prefix:1)" in out and "30 test items (" in out
    figures = json.loads((tmp_path / "r.json").read_text())
    task = figures["tasks"][0]
    assert task["n"] == 30 and set(task["policies"]) == {"full", "raee:k=4,tau=0.8", "oracle", "calibrated",
                                                         "calibrated:best", "raee"}
    calibrated = task["policies"]["calibrated"]
    held = calibrated["accuracy"] >= calibrated["accuracy_full"] - 0.005 - 1e-12
    assert calibrated["guarantee"] == ("held" if held else "missed")
    assert task["calibration_evidence"]["num_items"] == 120
    assert set(figures["cross_domain"]) == {"sst2->sst2"}
    assert (tmp_path / "p-sst2.png").exists()
