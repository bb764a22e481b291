"""Loading user checkpoints from local directories through the transformers Auto classes."""

from __future__ import annotations

import numpy as np
import pytest

from raee.backbones import load_backbone
from raee.errors import BackboneError
from raee.tasks import BUILTIN_TASKS
from tests.conftest import save_checkpoint, synthetic_texts, tiny_backbone

TASK = BUILTIN_TASKS["sst2"]
TEXTS = [t for t, _ in synthetic_texts(4, seed=11)]


@pytest.mark.parametrize("kind, expected", [("bert-mlm", "masked-lm"), ("roberta-mlm", "masked-lm"),
                                            ("llama", "causal-lm"), ("gpt2", "causal-lm")])
def test_checkpoint_kind_is_detected_and_answers_as_in_memory(tmp_path, kind, expected):
    loaded = load_backbone(str(save_checkpoint(kind, tmp_path / kind)))
    assert loaded.kind == expected and loaded.source == str((tmp_path / kind).resolve())
    in_memory = tiny_backbone(kind)
    np.testing.assert_allclose(loaded.all_layers(TEXTS, TASK).label_logits,
                               in_memory.all_layers(TEXTS, TASK).label_logits, atol=1e-5)
    assert loaded.fingerprint() == in_memory.fingerprint()


def test_plain_encoder_needs_an_explicit_kind(tmp_path):
    path = save_checkpoint("bert-encoder", tmp_path / "enc")
    with pytest.raises(BackboneError, match="cannot tell the backbone kind"):
        load_backbone(str(path))
    assert load_backbone(str(path), kind="sentence-encoder", scale=30).settings() == {"scale": 30.0}


def test_dtype_option(tmp_path):
    backbone = load_backbone(str(save_checkpoint("llama", tmp_path / "l")), dtype="bfloat16")
    assert backbone.identity()["dtype"] == "bfloat16"
    assert backbone.all_layers(TEXTS, TASK).label_logits.shape == (4, 4, 2)


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
