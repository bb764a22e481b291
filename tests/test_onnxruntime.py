"""The onnxruntime runtime: exported per layer, it answers as torch does (fp32), stops at each row's exit, caches
its export by weights and rebuilds a stale one, and a store built at one precision is refused at another."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch

from raee import cache, runtime
from raee.backbones import load_backbone, onnx
from raee.backbones.loading import place_on_runtime
from raee.build import build_store
from raee.data import read_examples
from raee.engine import Engine
from raee.errors import BackboneError, StoreMismatchError
from raee.keys import KeySpec
from raee.runtime import configure_threads, cpu_quota
from raee.store import load_store
from raee.tasks import BUILTIN_TASKS
from tests.tiny import FAMILIES, all_layers, save_checkpoint, synthetic_texts, tiny_backbone

TASK = BUILTIN_TASKS["sst2"]
TEXTS = [t for t, _ in synthetic_texts(8, seed=21)]
EXPORTABLE = ["bert-mlm", "roberta-mlm", "xlm-roberta-mlm", "electra-mlm", "distilbert-mlm", "bert-encoder"]


def on_onnxruntime(name: str, precision: str = "fp32"):
    backbone = tiny_backbone(name)
    place_on_runtime(backbone, "onnxruntime", precision)
    return backbone


@pytest.mark.slow
@pytest.mark.parametrize("name", EXPORTABLE)
def test_fp32_onnxruntime_answers_as_torch_at_every_layer(name):
    torch_backbone, ort_backbone = tiny_backbone(name), on_onnxruntime(name)
    assert (ort_backbone.runtime, ort_backbone.precision) == ("onnxruntime", "fp32")
    assert torch_backbone.runtime == "torch"
    ours, theirs = all_layers(ort_backbone, TASK, TEXTS, pooled_layers=(1,)), all_layers(torch_backbone, TASK, TEXTS,
                                                                                         pooled_layers=(1,))
    np.testing.assert_allclose(ours.label_logits, theirs.label_logits, atol=1e-4, rtol=1e-4)
    np.testing.assert_array_equal(ours.label_logits.argmax(-1), theirs.label_logits.argmax(-1))
    np.testing.assert_allclose(ours.pooled[1], theirs.pooled[1], atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["bert-mlm", "bert-encoder"])
def test_int8_stays_close_to_fp32(name):
    ours = all_layers(on_onnxruntime(name, "int8"), TASK, TEXTS).label_logits
    theirs = all_layers(tiny_backbone(name), TASK, TEXTS).label_logits
    assert np.abs(ours - theirs).max() < 0.5 and (ours.argmax(-1) == theirs.argmax(-1)).mean() > 0.8


def test_layers_past_the_exit_never_run_on_onnxruntime():
    backbone = on_onnxruntime("bert-mlm")
    prompting = TASK.prompting(backbone.kind, backbone.mask_token)
    head = backbone.head(prompting.head)
    rows = [0] * backbone.num_layers
    handles = [layer.register_forward_hook(lambda _l, args, _o, i=i: rows.__setitem__(i, rows[i] + args[0].shape[0]))
               for i, layer in enumerate(backbone.layers)]
    exits = torch.tensor([0, 3, 1, 2, 1, 3, 0, 2])
    try:
        batched = backbone.finish(backbone.start(prompting.prompts(TEXTS)), exits, head)
    finally:
        for h in handles:
            h.remove()
    assert rows == [int((exits > i).sum()) for i in range(backbone.num_layers)]
    for i, text in enumerate(TEXTS):  # and a mixed batch answers as one row at a time
        alone = backbone.finish(backbone.start(prompting.prompts([text])), exits[i:i + 1], head)
        torch.testing.assert_close(batched[i], alone[0], atol=1e-5, rtol=1e-4)


def test_every_session_runs_on_one_pool_for_the_process():
    """Per-session pools had to sleep between calls (spinning pools took the cores from each other), and each graph
    call then paid for waking them: the layers' sessions, the embeddings' and the prefix graph share one pool."""
    backbone = on_onnxruntime("bert-encoder")
    family = backbone.family
    assert family.prepare_prefix(backbone, 1)
    sessions = [family.embeddings, family._prefixes[1].session] + [layer.session for layer in family.layers]
    assert not any(s.get_session_options().use_per_session_threads for s in sessions)
    assert runtime.onnxruntime_pool is not None
    with pytest.raises(Exception, match="global thread pool"):  # onnxruntime's own word that the pool is global
        ort.InferenceSession(str(family.directory / "embeddings.onnx"), providers=["CPUExecutionProvider"])


def test_a_process_can_keep_a_pool_per_session(monkeypatch):
    """RAEE_ONNXRUNTIME_POOL=per-session, for a process whose other code makes sessions of its own: raee's sessions
    then keep pools of their own, sleeping between calls. (The options only: this test process's pool exists.)"""
    monkeypatch.setattr(runtime, "onnxruntime_pool", None)
    monkeypatch.setenv("RAEE_ONNXRUNTIME_POOL", "per-session")
    options = onnx.session_options(3)
    assert options.use_per_session_threads and options.intra_op_num_threads == 3
    assert options.get_session_config_entry("session.intra_op.allow_spinning") == "0"
    assert runtime.onnxruntime_pool is None  # no global pool made


def test_threads_set_after_the_pool_exists_say_the_pool_keeps_its_own(monkeypatch, caplog):
    before = torch.get_num_threads()
    monkeypatch.setattr(runtime, "onnxruntime_pool", 3)
    try:
        with caplog.at_level(logging.WARNING, logger="raee.runtime"):
            configure_threads(1)
    finally:
        configure_threads(before)
    assert "onnxruntime's pool keeps the 3 threads it was made with" in caplog.text


def test_rows_that_stay_run_at_their_own_width_once_the_longest_leaves():
    backbone = on_onnxruntime("bert-mlm")
    prompting = TASK.prompting(backbone.kind, backbone.mask_token)
    head = backbone.head(prompting.head)
    texts = [" ".join(TEXTS[2:5]), TEXTS[0], TEXTS[1]]  # the long text leaves first, after layer 1
    prompts = prompting.prompts(texts)
    lengths = backbone.token_counts(prompts)
    widths: list[list[int]] = [[] for _ in backbone.layers]
    handles = [layer.register_forward_hook(lambda _l, args, _o, i=i: widths[i].append(args[0].shape[1]))
               for i, layer in enumerate(backbone.layers)]
    exits = torch.tensor([1, 3, 2])
    try:
        batched = backbone.finish(backbone.start(prompts), exits, head)
    finally:
        for h in handles:
            h.remove()
    assert widths[0] == [max(lengths)]
    assert widths[1] == [max(lengths[1:])] and widths[2] == [lengths[1]]
    assert max(lengths[1:]) < max(lengths)
    for i, prompt in enumerate(prompts):  # cutting the padding changes no answer
        alone = backbone.finish(backbone.start([prompt]), exits[i:i + 1], head)
        torch.testing.assert_close(batched[i], alone[0], atol=1e-5, rtol=1e-4)


def _count_runs(session, counts, name):
    run = session.run
    session.run = lambda *a, **k: (counts.__setitem__(name, counts.get(name, 0) + 1), run(*a, **k))[1]


@pytest.mark.parametrize("precision", ["fp32", pytest.param("int8", marks=pytest.mark.slow)])
def test_a_prefix_key_is_one_graph_call_and_equals_the_layer_by_layer_pass(precision, caplog):
    fused, stepwise = on_onnxruntime("bert-encoder", precision), on_onnxruntime("bert-encoder", precision)
    with caplog.at_level(logging.WARNING):
        fused.prepare_prefix(2)
    assert "layer by layer" not in caplog.text  # the graph passed its check against the per-layer graphs
    counts: dict[str, int] = {}
    family = fused.family
    _count_runs(family.embeddings, counts, "embeddings")
    for layer in family.layers:
        _count_runs(layer.session, counts, f"layer {layer.index}")
    _count_runs(family._prefixes[2].session, counts, "prefix")
    rows = [0] * fused.num_layers
    handles = [layer.register_forward_hook(lambda _l, args, _o, i=i: rows.__setitem__(i, rows[i] + args[0].shape[0]))
               for i, layer in enumerate(fused.layers)]
    prompts = TASK.prompting(fused.kind, fused.mask_token).prompts(TEXTS)
    try:
        fwd, early, keys = fused.prefix_pass(prompts, 2)
    finally:
        for h in handles:
            h.remove()
    assert counts == {"prefix": 1}  # neither the embeddings graph nor a layer graph ran on their own
    assert rows == [len(TEXTS)] * 2 + [0] * (fused.num_layers - 2)  # hooks see layers 1..2 run, no further
    their_fwd, their_early, their_keys = stepwise.prefix_pass(prompts, 2)
    assert fwd.layer == their_fwd.layer == 2 and [s.layer for s in early] == [0, 1, 2]
    for ours, theirs in zip(early, their_early):
        torch.testing.assert_close(ours.hidden, theirs.hidden, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(keys, their_keys, atol=1e-6, rtol=1e-5)
    exits = torch.tensor([2, 3, 3, 2, 3, 2, 3, 2])
    head = fused.head(TASK.prompting(fused.kind, fused.mask_token).head)
    torch.testing.assert_close(fused.finish(fwd, exits, head), stepwise.finish(their_fwd, exits, head),
                               atol=1e-5, rtol=1e-4)


def test_a_prefix_graph_that_fails_its_check_is_not_used(monkeypatch, caplog):
    import raee.backbones.onnx as onnx

    def refuse(*_args):
        raise BackboneError("the prefix graph parts from the per-layer graphs at layer 1")

    monkeypatch.setattr(onnx, "_check_prefix", refuse)
    backbone = on_onnxruntime("bert-encoder")
    with caplog.at_level(logging.WARNING):
        backbone.prepare_prefix(1)
    assert "parts from the per-layer graphs" in caplog.text and "computed layer by layer" in caplog.text
    runs: dict[str, int] = {}
    _count_runs(backbone.family.embeddings, runs, "embeddings")
    prompts = TASK.prompting(backbone.kind, backbone.mask_token).prompts(TEXTS)
    fwd, early, keys = backbone.prefix_pass(prompts, 1)
    assert runs == {"embeddings": 1} and fwd.layer == 1 and len(early) == 2


def test_a_prefix_graph_that_parts_from_the_layers_is_caught_by_its_check(monkeypatch, tmp_path, caplog):
    import raee.backbones.onnx as onnx

    backbone = on_onnxruntime("bert-encoder")
    cache.use(tmp_path)  # the wrong graph goes to a cache of its own
    try:
        original = onnx._Prefix.forward

        def skips_the_last_layer(self, input_ids, mask):
            states = original(self, input_ids, mask)
            return (*states[:-2], states[-3], states[-1])  # the state "after" layer K is layer K-1's

        monkeypatch.setattr(onnx._Prefix, "forward", skips_the_last_layer)
        with caplog.at_level(logging.WARNING):
            assert backbone.prepare_prefix(2) is False
    finally:
        cache.use(None)
    assert "parts from the per-layer graphs at layer 2" in caplog.text


def test_the_prefix_export_key_is_the_same_on_either_runtime():
    """Made from the torch adapter's code whichever adapter the backbone runs on, so a change to that code makes a
    new prefix export, as it makes new per-layer graphs."""
    from raee.backbones.onnx import export_key

    assert export_key(tiny_backbone("bert-encoder"), 2) == export_key(on_onnxruntime("bert-encoder"), 2)
    assert export_key(tiny_backbone("bert-encoder"), 2).endswith("-prefix2")


@pytest.mark.slow
def test_a_damaged_prefix_graph_is_exported_again():
    backbone = on_onnxruntime("bert-encoder")
    backbone.prepare_prefix(1)
    graph = Path(backbone.family._prefixes[1].session._model_path)
    intact = graph.read_bytes()
    graph.write_bytes(intact[:-10] + b"0123456789")
    again = on_onnxruntime("bert-encoder")
    again.prepare_prefix(1)
    assert graph.read_bytes() == intact and again.family._prefixes[1] is not None


@pytest.mark.slow
@pytest.mark.parametrize("name", ["bert-encoder", "bert-mlm"])
def test_engine_exits_and_labels_equal_on_both_runtimes(name, sst2_like, tmp_path):
    examples = read_examples(sst2_like, TASK)
    build_store(tmp_path / "s", TASK, tiny_backbone(name), examples, key=KeySpec("prefix", 1), progress=False)
    queries = [t for t, _ in synthetic_texts(24, seed=4)]
    on_torch = Engine(load_store(tmp_path / "s"), tiny_backbone(name)).classify(queries)
    ort_engine = Engine(load_store(tmp_path / "s"), on_onnxruntime(name))
    assert ort_engine.backbone.family._prefixes[1] is not None  # the key came from the prefix graph
    on_ort = ort_engine.classify(queries)
    assert [(r.exit_layer, r.label) for r in on_ort] == [(r.exit_layer, r.label) for r in on_torch]
    np.testing.assert_allclose([r.scores for r in on_ort], [r.scores for r in on_torch], atol=1e-5)
    one_by_one = [ort_engine.classify([q])[0] for q in queries[:6]]  # batch 1, as a lone client sends
    assert [(r.exit_layer, r.label) for r in one_by_one] == [(r.exit_layer, r.label) for r in on_torch[:6]]
    np.testing.assert_allclose([r.scores for r in one_by_one], [r.scores for r in on_torch[:6]], atol=1e-5)


@pytest.mark.slow
def test_a_store_is_refused_at_another_precision(sst2_like, tmp_path, caplog):
    examples = read_examples(sst2_like, TASK)[:80]
    build_store(tmp_path / "s", TASK, on_onnxruntime("bert-mlm", "int8"), examples, key=KeySpec("prefix", 1),
                progress=False)
    store = load_store(tmp_path / "s")
    assert (store.manifest.backbone.runtime, store.manifest.backbone.precision) == ("onnxruntime", "int8")
    with pytest.raises(StoreMismatchError, match="precision: store has 'int8', running 'fp32'.*--precision"):
        Engine(store, on_onnxruntime("bert-mlm", "fp32"))
    with pytest.raises(StoreMismatchError, match="precision"):
        Engine(store, tiny_backbone("bert-mlm"))
    with caplog.at_level(logging.WARNING):
        Engine(store, tiny_backbone("bert-mlm"), allow_precision_mismatch=True).classify(TEXTS[:2])
    assert "records come from int8" in caplog.text
    Engine(store, on_onnxruntime("bert-mlm", "int8")).classify(TEXTS[:2])  # its own precision serves


@pytest.mark.slow
def test_the_export_is_made_once_and_a_stale_one_is_rebuilt():
    """Seen from the cache directory: a second load writes nothing; a damaged graph is exported anew, whole."""
    first = on_onnxruntime("roberta-mlm")
    directory: Path = first.family.directory
    written = {p.name: p.stat().st_mtime_ns for p in directory.iterdir()}
    on_onnxruntime("roberta-mlm")
    assert {p.name: p.stat().st_mtime_ns for p in directory.iterdir()} == written
    meta = json.loads((directory / "meta.json").read_text())
    assert meta["precision"] == "fp32" and max(meta["max_difference_by_layer"]) < 1e-4
    graph = directory / "layer_001.onnx"
    intact = graph.read_bytes()
    graph.write_bytes(intact[:-10] + b"0123456789")  # a damaged graph: its checksum no longer matches
    rebuilt = on_onnxruntime("roberta-mlm")
    assert rebuilt.family.directory == directory and graph.read_bytes() == intact
    assert (directory / "meta.json").stat().st_mtime_ns > written["meta.json"]  # exported again, not patched
    np.testing.assert_allclose(all_layers(rebuilt, TASK, TEXTS).label_logits,
                               all_layers(first, TASK, TEXTS).label_logits, atol=1e-5)


@pytest.mark.slow
def test_an_unwritable_cache_exports_to_a_temporary_directory(tmp_path, caplog):
    (tmp_path / "a-file").write_text("not a directory")
    cache.use(tmp_path / "a-file" / "cache")  # cannot be created, whoever runs the test (root included)
    try:
        with caplog.at_level(logging.WARNING):
            backbone = on_onnxruntime("electra-mlm")
    finally:
        cache.use(None)
    assert "cannot be written" in caplog.text and backbone.runtime == "onnxruntime"
    assert not str(backbone.family.directory).startswith(str(tmp_path))


def test_families_that_do_not_export_run_on_torch_and_say_so_when_forced():
    llama = tiny_backbone("llama")
    place_on_runtime(llama, "auto")
    assert llama.runtime == "torch"
    with pytest.raises(BackboneError, match="onnxruntime runtime runs .* exportable families .* --runtime torch"):
        place_on_runtime(tiny_backbone("t5"), "onnxruntime")
    with pytest.raises(BackboneError, match="int8 runs on --runtime onnxruntime"):
        place_on_runtime(tiny_backbone("gpt2"), "torch", "int8")
    assert set(EXPORTABLE) <= set(FAMILIES)


def test_load_backbone_picks_onnxruntime_for_an_exportable_checkpoint(tmp_path):
    path = str(save_checkpoint("bert-mlm", tmp_path / "bert"))
    assert load_backbone(path).runtime == "onnxruntime"
    assert load_backbone(path, runtime="torch").runtime == "torch"
    assert load_backbone(str(save_checkpoint("gpt2", tmp_path / "gpt2"))).runtime == "torch"


@pytest.mark.parametrize("files, expected", [
    ({"cpu.max": "200000 100000\n"}, (2, "cgroup cpu.max")),
    ({"cpu.max": "150000 100000\n"}, (2, "cgroup cpu.max")),
    ({"cpu/cpu.cfs_quota_us": "300000\n", "cpu/cpu.cfs_period_us": "100000\n"}, (3, "cgroup cpu.cfs_quota_us")),
])
def test_threads_default_to_the_containers_cpu_quota(tmp_path, files, expected):
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    assert cpu_quota(str(tmp_path)) == expected


def test_no_quota_means_the_cpus_this_process_may_use(tmp_path):
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert cpu_quota(str(tmp_path))[1] == "CPU affinity"


def test_configure_threads_sets_torch_and_faiss(monkeypatch):
    import faiss
    before = torch.get_num_threads()
    try:
        assert configure_threads(1) == 1 and torch.get_num_threads() == 1 and faiss.omp_get_max_threads() == 1
        monkeypatch.setenv("RAEE_THREADS", "2")
        assert configure_threads() == 2
    finally:
        configure_threads(before)
