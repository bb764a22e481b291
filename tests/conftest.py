"""Session fixtures over the tiny backbones of tests/tiny.py. The self-check verdict cache goes to a fresh
directory so that every session runs the checks it tests."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import pytest

os.environ["RAEE_CACHE_DIR"] = tempfile.mkdtemp(prefix="raee-test-cache-")

from tests.tiny import (  # noqa: E402,F401
    FAMILIES,
    KIND_OF,
    VOCAB,
    make_tokenizer,
    save_checkpoint,
    synthetic_texts,
    tiny_backbone,
    tiny_model,
)

# The tiny models the older suites run everything on: one per kind, and RoBERTa and GPT-2 beside them.
KINDS = ["bert-mlm", "roberta-mlm", "llama", "gpt2", "bert-encoder", "t5"]


@pytest.fixture(scope="session", params=FAMILIES)
def backbone(request):
    return tiny_backbone(request.param)


@pytest.fixture(scope="session")
def encoder_backbone():
    return tiny_backbone("bert-encoder")


@pytest.fixture(scope="session")
def sst2_like(tmp_path_factory) -> Path:
    """A JSONL calibration file in the sst2 label names."""
    path = tmp_path_factory.mktemp("data") / "train.jsonl"
    path.write_text("".join(json.dumps({"text": t, "label": y}) + "\n" for t, y in synthetic_texts(240)))
    return path
