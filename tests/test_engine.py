"""Building stores with tiny backbones and classifying through the Engine: exits, policies, keys, shards, errors."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from raee.accuracy_rule import AccuracyRuleConfig
from raee.backbones.base import length_groups
from raee.build import build_store, calibrate_store, merge_stores, run_calibration_pass
from raee.calibration import CalibrationSettings
from raee.data import read_examples
from raee.engine import Engine
from raee.errors import InputError, StoreError, StoreMismatchError
from raee.exits import decide
from raee.index import IndexSpec, index_type_of, search
from raee.keys import Embedder, KeySpec
from raee.offdomain import conformal_pvalues, cusum_alarms
from raee.raee_rule import RaeeConfig, raee_exit_layers
from raee.records import softmax
from raee.store import load_store
from raee.tasks import BUILTIN_TASKS
from tests.tiny import all_layers, save_checkpoint, synthetic_texts, tiny_backbone

TASK = BUILTIN_TASKS["sst2"]
QUERIES = [t for t, _ in synthetic_texts(16, seed=7)]


@pytest.fixture(scope="module")
def examples(sst2_like):
    return read_examples(sst2_like, TASK)


@pytest.fixture(scope="module", params=["bert-mlm", pytest.param("llama", marks=pytest.mark.slow),
                                        pytest.param("bert-encoder", marks=pytest.mark.slow)])
def engine(request, examples, tmp_path_factory):
    backbone = tiny_backbone(request.param)
    out = tmp_path_factory.mktemp(request.param) / "store"
    build_store(out, TASK, backbone, examples, key=KeySpec("prefix", 1), progress=False)
    return Engine(load_store(out), backbone)


def test_raee_exits_match_the_policy_on_the_store(engine):
    """The engine's exits are RAEE's on the same neighbours, and its labels are the backbone's at those layers."""
    results = engine.classify(QUERIES, policy="raee")
    every = all_layers(engine.backbone, TASK, QUERIES, pooled_layers=(1,))
    sims, ids = search(engine.store.index, every.pooled[1], 12)
    expected = raee_exit_layers(sims, ids, engine.store.records.record_probability(), RaeeConfig())
    assert [r.exit_layer for r in results] == expected.tolist()
    labels = every.label_logits[np.arange(len(QUERIES)), expected].argmax(axis=1)
    assert [r.label_index for r in results] == labels.tolist()
    for r in results:
        assert r.layers_run == max(r.exit_layer, 1) and r.num_layers == 3
        assert r.label == TASK.labels[r.label_index] and sum(r.scores) == pytest.approx(1.0, abs=1e-5)
        assert r.times.key_ms >= 0 and r.times.search_ms >= 0 and r.times.backbone_ms > 0


@pytest.fixture(scope="module")
def encoder_engine(examples, tmp_path_factory):
    """A sentence-encoder store on the prefix:1 key: its neighbours' votes send some texts out at the key's layers
    and others deeper (the masked-LM tiny model predicts one label everywhere, which votes cannot tell apart)."""
    backbone = tiny_backbone("bert-encoder")
    out = tmp_path_factory.mktemp("votes") / "store"
    build_store(out, TASK, backbone, examples, key=KeySpec("prefix", 1), progress=False)
    return Engine(load_store(out), backbone)


@pytest.mark.parametrize("cost", [0.0, 0.1])
def test_votes_read_the_texts_own_predictions_at_the_key_layers(encoder_engine, cost):
    """key_layers=votes: the engine's exits are the rule's on the same neighbours with each text's predictions at
    layers 0..K; a text that leaves there answers with the logits read for the decision, one that runs on with
    its exit layer's; a batch cut into length groups answers as texts alone do."""
    engine = encoder_engine
    policy = f"accuracy:key_layers=votes,cost={cost}"
    results = engine.classify(QUERIES, policy=policy)
    every = all_layers(engine.backbone, TASK, QUERIES, pooled_layers=(1,))
    resolved = engine.resolve(policy)
    sims, ids = search(engine.store.index, every.pooled[1], resolved.search_width)
    predicted = every.label_logits[:, :2].argmax(axis=2)
    expected = decide(resolved, sims, ids, engine.arrays, 1, None, predicted).exits
    assert [r.exit_layer for r in results] == expected.tolist()
    assert expected.min() <= 1 < expected.max(), "some texts should leave at the key's layers and some run on"
    at_exit = every.label_logits[np.arange(len(QUERIES)), expected]
    np.testing.assert_allclose([r.scores for r in results], softmax(at_exit), atol=1e-4)
    records = decide(engine.resolve(f"accuracy:cost={cost}"), sims, ids, engine.arrays, 1, None).exits
    assert records.tolist() != expected.tolist(), "votes should change some exits here, or this test checks little"
    with pytest.raises(InputError, match="predictions at layers 0..1"):
        decide(resolved, sims, ids, engine.arrays, 1, None)  # votes without the texts' predictions
    texts = [q if i % 2 else " ".join([q] * 4) for i, q in enumerate(QUERIES)]
    assert len(engine.backbone.length_groups(engine.backbone.tokens(engine.prompting.prompts(texts)))) >= 2
    for text, got in zip(texts, engine.classify(texts, policy=policy)):
        alone = engine.classify([text], policy=policy)[0]
        assert (got.exit_layer, got.label_index) == (alone.exit_layer, alone.label_index)
        np.testing.assert_allclose(got.scores, alone.scores, atol=1e-4)


def test_engine_never_runs_layers_past_the_deepest_exit(engine):
    results = engine.classify(QUERIES[:4], policy="static:2")
    calls = [0] * engine.num_layers
    hooks = [layer.register_forward_hook(lambda *_a, i=i: calls.__setitem__(i, calls[i] + 1))
             for i, layer in enumerate(engine.backbone.layers)]
    try:
        results = engine.classify(QUERIES[:4], policy="static:2")
    finally:
        for h in hooks:
            h.remove()
    assert calls == [1, 1, 0] and {r.exit_layer for r in results} == {2}


def test_fixed_policies_and_neighbours(engine):
    full = engine.classify(QUERIES, policy="full")
    assert {r.exit_layer for r in full} == {3}
    reference = all_layers(engine.backbone, TASK, QUERIES).label_logits[:, 3].argmax(axis=1)
    assert [r.label_index for r in full] == reference.tolist()
    with_neighbours = engine.classify(QUERIES[:2], policy="raee:k=5", with_neighbours=True)
    assert all(len(r.neighbours) == 5 for r in with_neighbours)
    assert with_neighbours[0].neighbours[0].similarity >= with_neighbours[0].neighbours[-1].similarity


@pytest.mark.parametrize("call, message", [
    (dict(texts=[]), "no texts"),
    (dict(texts="good film"), "list of strings"),
    (dict(texts=["good", None]), "text 1 is empty"),
    (dict(texts=["good", ""]), "text 1 is empty"),
    (dict(texts=["good " * 200]), "tokens"),
    (dict(texts=["good"], policy="fastest"), "policy 'fastest'"),
    (dict(texts=["good"], policy="static:9"), "past the last layer"),
    (dict(texts=["good"], policy="raee:k=0"), "out of range"),
    (dict(texts=["good"], policy="oracle"), "cannot be served"),
    (dict(texts=["good"], policy=["raee"]), "a policy is a string"),
])
def test_bad_requests_are_refused_with_a_reason(engine, call, message):
    with pytest.raises(InputError, match=message):
        engine.classify(**call)


def test_resolved_policies_are_remembered_within_a_bound(engine, monkeypatch):
    """A policy is parsed and resolved once, a refused one every time, and the memory of them stays bounded
    however many distinct policies clients send."""
    from raee import engine as engine_module

    calls = []
    real = engine_module.resolve
    monkeypatch.setattr(engine_module, "resolve", lambda *a: calls.append(a[0]) or real(*a))
    engine._resolved.clear()
    first = engine.classify(QUERIES[:2], policy="raee:k=5")
    again = engine.classify(QUERIES[:2], policy="raee:k=5")
    assert len(calls) == 1 and [r.exit_layer for r in first] == [r.exit_layer for r in again]
    for _ in range(2):
        with pytest.raises(InputError, match="cannot be served"):
            engine.classify(QUERIES[:1], policy="oracle")
    for k in range(1, 2 * engine_module.RESOLVED_POLICIES):
        engine.resolve(f"raee:k={k}")
    assert len(engine._resolved) <= engine_module.RESOLVED_POLICIES


def test_a_long_text_is_refused_on_its_prefix(engine):
    """Engine.check_prefix tokenizes the prompt of a long text's prefix (Backbone.prefix_to_check) and refuses the
    text when that is already over the limit; a text the prefix test cannot settle is left to the whole check."""
    backbone = engine.backbone
    prefix = backbone.prefix_to_check("good " * 100)
    tokens = backbone.token_counts(engine.prompting.prompts([prefix]))[0]
    with pytest.raises(InputError, match=f"text 3 is over {tokens} tokens with its prompt \\(its first "
                                         f"{len(prefix)} characters already are\\); the limit is 64"):
        engine.check_prefix(3, "good " * 100)
    engine.check_prefix(0, "good " * 70)  # 350 characters: no prefix test (the whole check refuses it)
    engine.check_prefix(0, "x" * 399 + " good")  # no space within reach: left to the whole check


@pytest.mark.parametrize("objective", ["best", "match-full"])
def test_the_calibrated_policy_is_served_by_default(examples, tmp_path, objective):
    backbone = tiny_backbone("bert-encoder")
    build_store(tmp_path / "s", TASK, backbone, examples, key=KeySpec("prefix", 1), progress=False,
                settings=CalibrationSettings(objective=objective))
    engine = Engine(load_store(tmp_path / "s"), backbone)
    policy = engine.store.calibrated_policy
    assert policy.settings.objective == objective
    assert policy.settings.key_layers == "votes"  # a prefix key's build reads its layers by votes, and says so
    assert calibrate_store(engine.store, objective).name == policy.name  # recalibrating reproduces the build's
    old = dataclasses.replace(engine.store.manifest.calibration_settings, key_layers="records")  # a store from before
    engine.store.manifest = dataclasses.replace(engine.store.manifest, calibration_settings=old)
    again = calibrate_store(engine.store, objective)
    assert again.settings.key_layers == "records"  # as it was built: every accuracy rule it searches reads records
    assert not isinstance(again.rule, AccuracyRuleConfig) or again.rule.key_layers == "records"
    resolved = engine.resolve("calibrated")
    if policy.rule is None:  # 240 items cannot certify 0.5 point: match-full serves full depth
        assert objective == "match-full" and resolved.fixed_layer == 3
        assert {r.exit_layer for r in engine.classify(QUERIES)} == {3}
        return
    every = all_layers(backbone, TASK, QUERIES, pooled_layers=(1,))
    sims, ids = search(engine.store.index, every.pooled[1], resolved.search_width)
    alarms, _ = cusum_alarms(conformal_pvalues(policy.gate, sims[:, 0]), 0.0, policy.gate)
    expected = decide(resolved, sims, ids, engine.arrays, 1, alarms, every.label_logits[:, :2].argmax(axis=2))
    results = engine.classify(QUERIES)
    assert [r.exit_layer for r in results] == expected.exits.tolist()
    assert [r.off_domain for r in results] == expected.off_domain.tolist()


def test_off_domain_texts_go_to_full_depth_and_say_why(examples, tmp_path):
    backbone = tiny_backbone("bert-encoder")
    build_store(tmp_path / "s", TASK, backbone, examples, key=KeySpec("prefix", 1), progress=False,
                settings=CalibrationSettings(objective="best"))
    store = load_store(tmp_path / "s")
    assert store.calibrated_policy.gate is not None
    calibrated = store.calibrated_policy
    far = dataclasses.replace(calibrated, gate=dataclasses.replace(calibrated.gate, min_similarity=2.0))
    store.manifest = dataclasses.replace(store.manifest, calibrated_policy=far)  # nothing is close enough now
    results = Engine(store, backbone).classify(QUERIES[:4])
    assert [(r.exit_layer, r.layers_run, r.off_domain) for r in results] == [(3, 3, "far")] * 4
    assert all(r.off_domain == "" for r in Engine(store, backbone).classify(QUERIES[:4], policy="raee"))


def test_embedder_key_time_excludes_the_backbone(examples, tmp_path):
    """With an embedder key, the backbone's tokenizing and embedding belong to the backbone stage, not to the key
    (the batch is tokenized before the key, so that a bad text is refused before any work)."""
    import time as clock
    from unittest.mock import Mock
    backbone = tiny_backbone("bert-mlm")
    embedder = Mock(spec=Embedder)
    embedder.identity.return_value = {"source": "mock", "fingerprint": "f", "dim": 8}
    embedder.fingerprint.return_value = "f"
    rng = np.random.default_rng(0)
    embedder.encode.side_effect = lambda texts, **_: (lambda k: k / np.linalg.norm(k, axis=1, keepdims=True))(
        rng.normal(size=(len(texts), 8)).astype(np.float32))
    build_store(tmp_path / "s", TASK, backbone, examples[:60], key=KeySpec("embedder"), embedder=embedder,
                progress=False)
    engine = Engine(load_store(tmp_path / "s"), backbone, embedder)
    start, tokenize = backbone.start, backbone.tokenize
    backbone.start = lambda *a, **k: (clock.sleep(0.05), start(*a, **k))[1]
    backbone.tokenize = lambda *a, **k: (clock.sleep(0.05), tokenize(*a, **k))[1]
    try:
        times = engine.classify(QUERIES[:2], policy="raee")[0].times
    finally:
        del backbone.start, backbone.tokenize
    assert times.key_ms < 40 and times.backbone_ms >= 100


def test_store_for_another_backbone_is_refused(engine):
    with pytest.raises(StoreMismatchError):
        Engine(engine.store, tiny_backbone("gpt2"))


@pytest.mark.slow
def test_sharded_build_merges_into_the_unsharded_store(examples, tmp_path):
    backbone = tiny_backbone("bert-encoder")
    key = KeySpec("prefix", 2)
    build_store(tmp_path / "whole", TASK, backbone, examples, key=key, progress=False)
    parts = []
    for i in (2, 0, 1):  # shards may be built and listed in any order
        build_store(tmp_path / f"part{i}", TASK, backbone, examples, key=key, shard=(i, 3), progress=False)
        parts.append(tmp_path / f"part{i}")
    merge_stores(tmp_path / "merged", parts)
    whole, merged = load_store(tmp_path / "whole"), load_store(tmp_path / "merged")
    np.testing.assert_allclose(merged.records.label_logits, whole.records.label_logits, atol=1e-5)
    np.testing.assert_array_equal(merged.records.gold, whole.records.gold)
    a = Engine(whole, backbone).classify(QUERIES, with_neighbours=True)
    b = Engine(merged, backbone).classify(QUERIES, with_neighbours=True)
    assert [(r.label, r.exit_layer) for r in a] == [(r.label, r.exit_layer) for r in b]
    assert [[n.id for n in r.neighbours] for r in a] == [[n.id for n in r.neighbours] for r in b]
    assert merged.calibrated_policy == whole.calibrated_policy  # merging calibrates on every item
    assert merged.calibration_evidence.curve == whole.calibration_evidence.curve
    assert load_store(tmp_path / "part0").calibration_evidence is None  # shards are not calibrated alone
    with pytest.raises(StoreError, match="shards 0..2"):
        merge_stores(tmp_path / "bad", parts[:2])


@pytest.mark.slow
def test_embedder_keys_with_a_local_sentence_transformer(examples, tmp_path):
    from sentence_transformers import SentenceTransformer, models
    checkpoint = save_checkpoint("bert-encoder", tmp_path / "ckpt")
    encoder = models.Transformer(str(checkpoint))
    SentenceTransformer(modules=[encoder, models.Pooling(32, "mean")]).save(str(tmp_path / "embedder"))
    embedder = Embedder(str(tmp_path / "embedder"))
    backbone = tiny_backbone("bert-mlm")
    build_store(tmp_path / "s", TASK, backbone, examples[:60], key=KeySpec("embedder"), embedder=embedder,
                progress=False)
    store = load_store(tmp_path / "s")
    assert store.manifest.embedder.fingerprint == embedder.fingerprint()
    results = Engine(store, backbone, embedder).classify(QUERIES, policy="raee")
    sims, ids = search(store.index, embedder.encode(QUERIES), 12)
    expected = raee_exit_layers(sims, ids, store.records.record_probability(), RaeeConfig())
    assert [r.exit_layer for r in results] == expected.tolist()
    assert [r.layers_run for r in results] == expected.tolist()  # an embedder key runs no backbone layer first
    with pytest.raises(InputError, match="key_layers=votes reads the predictions at the layers a prefix key ran"):
        Engine(store, backbone, embedder).classify(QUERIES[:1], policy="accuracy:key_layers=votes")
    with pytest.raises(StoreMismatchError, match="embedder"):
        Engine(store, backbone, None)


def test_calibration_skips_items_too_long_for_the_backbone(examples, caplog):
    backbone = tiny_backbone("bert-encoder")
    long_item = type(examples[0])(text="good " * 100, label=1, line=999)
    result = run_calibration_pass(backbone, TASK, [*examples[:5], long_item], KeySpec("prefix", 1),
                                  progress=False)
    assert result.records.num_items == 5 and "999" in caplog.text


def test_label_ids_follow_the_task_definition_not_just_its_name():
    import dataclasses
    backbone = tiny_backbone("bert-mlm")
    swapped = dataclasses.replace(TASK, label_words={"masked-lm": ("great", "terrible")})
    ids = [backbone.head(task.head_spec("masked-lm")).ids.tolist() for task in (TASK, swapped)]
    assert ids[0] == ids[1][::-1]


@pytest.mark.slow
@pytest.mark.parametrize("index_type", ["flat-fp16", "hnsw", "ivf"])
def test_the_engine_over_hnsw_ivf_and_fp16_stores(examples, tmp_path, index_type):
    """Stores on approximate or float16 indexes serve through the same engine: the index loads as built, the
    engine's exits are RAEE's on that index's own neighbours, and on a store this small (IVF probes every list,
    HNSW's beam spans the graph) they are the exact search's; float16 keys swap a few near-ties."""
    backbone = tiny_backbone("bert-encoder")
    build_store(tmp_path / "s", TASK, backbone, examples, key=KeySpec("prefix", 1), index_spec=IndexSpec(index_type),
                progress=False)
    build_store(tmp_path / "flat", TASK, backbone, examples, key=KeySpec("prefix", 1), index_spec=IndexSpec("flat"),
                progress=False)
    engine = Engine(load_store(tmp_path / "s"), backbone)
    assert index_type_of(engine.store.index) == index_type and engine.store.index.ntotal == len(examples)
    every = all_layers(backbone, TASK, QUERIES, pooled_layers=(1,))
    sims, ids = search(engine.store.index, every.pooled[1], 12)
    expected = raee_exit_layers(sims, ids, engine.store.records.record_probability(), RaeeConfig())
    results = engine.classify(QUERIES, policy="raee", with_neighbours=True)
    assert [r.exit_layer for r in results] == expected.tolist()
    assert [[n.id for n in r.neighbours] for r in results] == ids.tolist()
    exact = Engine(load_store(tmp_path / "flat"), backbone).classify(QUERIES, policy="raee", with_neighbours=True)
    found, wanted = ([[n.id for n in r.neighbours] for r in rs] for rs in (results, exact))
    if index_type == "flat-fp16":  # the tiny model's keys lie close together: rounding swaps near-ties within them
        assert [set(a) for a in found] == [set(b) for b in wanted]
        assert [a[0] for a in found] == [b[0] for b in wanted]
    else:
        assert found == wanted


def test_length_groups_cut_a_sorted_batch_where_padding_grows():
    counts = [30, 5, 6, 31, 5, 7, 29, 6, 5, 32, 6, 28, 7, 5, 30, 6, 33, 29]
    groups = length_groups(counts, min_rows=4, allowance=0.25)
    rows = np.concatenate(groups)
    assert sorted(rows.tolist()) == list(range(len(counts)))  # every row once
    widths = [[counts[i] for i in g] for g in groups]
    assert [w for g in widths for w in g] == sorted(counts)  # shortest first
    assert all(len(g) >= 4 for g in groups[:-1])
    ordered, end = sorted(counts), 0
    for g in widths[:-1]:  # a group closes only where the next row would pad it past the allowance
        end += len(g)
        assert (len(g) + 1) * ordered[end] > 1.25 * (sum(g) + ordered[end])
    assert len(groups) == 2  # the short texts, then the long ones
    assert [g.tolist() for g in length_groups(counts[:4], min_rows=4)] == [[0, 1, 2, 3]]  # small: as it came


@pytest.mark.parametrize("policy", ["calibrated", "raee", "static:2"])
def test_a_batch_cut_into_length_groups_answers_as_texts_alone_do(engine, policy, monkeypatch):
    """Short and long texts in one batch run in separate groups (layer 1 sees two calls), tokenized once for all
    groups, and every text gets the exit, label and scores it gets alone; each layer runs exactly the rows that
    reach it (none past its exit)."""
    texts = [q if i % 2 else " ".join([q] * 4) for i, q in enumerate(QUERIES)]
    assert len(engine.backbone.length_groups(engine.backbone.tokens(engine.prompting.prompts(texts)))) >= 2
    calls, rows = [0] * engine.num_layers, [0] * engine.num_layers

    def count(i, hidden):
        calls[i] += 1
        rows[i] += hidden.shape[0]
    hooks = [layer.register_forward_hook(lambda _layer, args, _out, i=i: count(i, args[0]))
             for i, layer in enumerate(engine.backbone.layers)]
    tokenized: list[int] = []
    tokenize = engine.backbone.tokenize
    monkeypatch.setattr(engine.backbone, "tokenize", lambda prompts: tokenized.append(len(prompts)) or
                        tokenize(prompts))
    try:
        batched = engine.classify(texts, policy=policy)
    finally:
        for h in hooks:
            h.remove()
        monkeypatch.undo()
    assert calls[0] >= 2
    assert tokenized == [len(texts)]
    assert rows == [sum(r.layers_run > i for r in batched) for i in range(engine.num_layers)]
    if policy == "static:2":
        assert calls[2] == 0
    for text, got in zip(texts, batched):
        alone = engine.classify([text], policy=policy)[0]
        assert (got.exit_layer, got.label_index, got.off_domain) == (alone.exit_layer, alone.label_index,
                                                                     alone.off_domain)
        np.testing.assert_allclose(got.scores, alone.scores, atol=1e-4)


def test_a_backbone_on_a_gpu_runs_a_batch_as_one_group(engine, monkeypatch):
    texts = [q if i % 2 else " ".join([q] * 4) for i, q in enumerate(QUERIES)]
    tokens = engine.backbone.tokens(engine.prompting.prompts(texts))
    assert len(engine.backbone.length_groups(tokens)) >= 2
    monkeypatch.setattr(type(engine.backbone), "device", property(lambda self: torch.device("cuda")))
    assert [g.tolist() for g in engine.backbone.length_groups(tokens)] == [list(range(len(texts)))]


def test_token_ids_are_taken_only_by_the_backbone_that_checked_them(engine):
    tokens = engine.backbone.tokens(engine.prompting.prompts(QUERIES[:2]))
    assert len(tokens.rows(np.array([1]))) == 1
    other = tiny_backbone("bert-encoder")
    with pytest.raises(InputError, match="another backbone"):
        other.start(tokens)
