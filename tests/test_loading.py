"""Loading user checkpoints from local directories through the transformers Auto classes, and the whole product
(raee-index build, raee-eval, raee-serve) on saved tiny DeBERTa-v2 (with conv) and T5 checkpoints."""

from __future__ import annotations

import json

import numpy as np
import pytest

from indexer.cli import main as raee_index
from indexer.evaluate import main as raee_eval
from raee.backbones import load_backbone
from raee.data import read_examples
from raee.engine import Engine
from raee.errors import BackboneError
from raee.tasks import BUILTIN_TASKS
from service.client import Client
from service.config import ServerConfig
from service.server import RaeeServer
from tests.tiny import FAMILIES, KIND_OF, all_layers, family_params, save_checkpoint, synthetic_texts, tiny_backbone

TASK = BUILTIN_TASKS["sst2"]
TEXTS = [t for t, _ in synthetic_texts(4, seed=11)]
# Plain encoders need --kind (below). transformers loads its own Qwen2Tokenizer (byte-level BPE) for any qwen2
# checkpoint, which cannot read the tiny word-level vocabulary; in-memory qwen2 is tested everywhere else.
SAVED = [name for name in FAMILIES if KIND_OF[name] != "sentence-encoder" and name != "qwen2"]


@pytest.mark.parametrize("name", family_params(SAVED))
def test_checkpoint_kind_and_family_are_detected_and_answer_as_in_memory(tmp_path, name):
    loaded = load_backbone(str(save_checkpoint(name, tmp_path / name)))
    in_memory = tiny_backbone(name)
    assert loaded.kind == KIND_OF[name] and loaded.source == str((tmp_path / name).resolve())
    assert loaded.family.name == in_memory.family.name
    np.testing.assert_allclose(all_layers(loaded, TASK, TEXTS).label_logits,
                               all_layers(in_memory, TASK, TEXTS).label_logits, atol=1e-5)
    assert loaded.fingerprint() == in_memory.fingerprint()


def test_plain_encoder_needs_an_explicit_kind(tmp_path):
    path = save_checkpoint("bert-encoder", tmp_path / "enc")
    with pytest.raises(BackboneError, match="cannot tell the backbone kind .* pass --kind"):
        load_backbone(str(path))
    assert load_backbone(str(path), kind="sentence-encoder", scale=30).settings() == {"scale": 30.0}


def test_dtype_option(tmp_path):
    import torch
    checkpoint = str(save_checkpoint("llama", tmp_path / "l"))
    backbone = load_backbone(checkpoint, dtype="bfloat16")
    assert backbone.identity()["dtype"] == "bfloat16" and backbone.precision == "bf16"
    assert {p.dtype for p in backbone.model.parameters()} == {torch.bfloat16}
    ours = all_layers(backbone, TASK, TEXTS).label_logits
    float32 = all_layers(load_backbone(checkpoint), TASK, TEXTS).label_logits
    assert ours.shape == float32.shape == (4, 4, 2)
    np.testing.assert_allclose(ours, float32, atol=0.1)  # bfloat16 rounding, not another model
    assert not np.array_equal(ours, float32)


@pytest.mark.parametrize("call, message", [
    (dict(source="/nonexistent/model"), "no checkpoint directory"),
    (dict(source=None, dtype="int3"), "dtype"),
    (dict(source=None, device="cuda:7"), "CUDA"),
])
def test_bad_loading_options_say_why(call, message):
    import torch
    if "device" in call and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(BackboneError, match=message):
        load_backbone(**call)


def test_a_directory_without_config_is_refused_in_one_line(tmp_path):
    with pytest.raises(BackboneError, match="holds no config.json"):
        load_backbone(str(tmp_path))


@pytest.mark.slow
@pytest.mark.parametrize("name, layers", [("deberta-v2-mlm", 3), ("t5", 5)])
def test_build_eval_and_serve_a_saved_checkpoint(name, layers, tmp_path, sst2_like, capsys):
    """`--backbone DIR` through raee-index build, raee-eval and raee-serve: the product end to end on the two
    families the generic path got wrong (DeBERTa-v2's conv, T5's position biases and its decoder)."""
    checkpoint = str(save_checkpoint(name, tmp_path / name))
    store = tmp_path / "store"
    assert raee_index(["build", "--task", "sst2", "--train", str(sst2_like), "--out", str(store), "--backbone",
                       checkpoint, "--key", "prefix:1", "--no-progress"]) == 0
    assert f"{len(read_examples(sst2_like, TASK))} items" in capsys.readouterr().out
    assert raee_eval(["--store", str(store), "--test", str(sst2_like), "--policies", "raee,full,static:1",
                      "--limit", "30", "--timing-sample", "5", "--json", str(tmp_path / "eval.json"),
                      "--no-progress"]) == 0
    figures = json.loads((tmp_path / "eval.json").read_text())
    assert figures["num_layers"] == layers and figures["policies"]["full"]["avg_exit_layer"] == layers
    server = RaeeServer(ServerConfig(stores=(str(store),), host="127.0.0.1", port=0, metrics_port=-1)).start()
    try:
        assert server.loaded.wait(120) and server.load_error is None
        with Client(f"127.0.0.1:{server.port}") as client:
            result = client.classify(TEXTS, task="sst2")
            full = client.classify(TEXTS, task="sst2", policy="full")
            assert client.info().backbone["num_layers"] == layers
    finally:
        server.stop(0)
    expected = all_layers(load_backbone(checkpoint), TASK, TEXTS).label_logits
    assert [r.label_index for r in full.results] == expected[:, layers].argmax(axis=1).tolist()
    in_process = Engine.load(store).classify(TEXTS)  # the served policy's exits, decided here the same way
    assert [r.exit_layer for r in result.results] == [r.exit_layer for r in in_process]
    assert [r.label_index for r in result.results] == [int(logits[r.exit_layer].argmax())
                                                       for r, logits in zip(result.results, expected)]
