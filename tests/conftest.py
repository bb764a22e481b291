"""Session fixtures over the tiny backbones of tests/tiny.py. The self-check verdict cache goes to a fresh
directory so that every session runs the checks it tests."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import pytest

os.environ["RAEE_CACHE_DIR"] = tempfile.mkdtemp(prefix="raee-test-cache-")

from tests.tiny import FAMILIES, family_params, save_checkpoint, synthetic_texts, tiny_backbone  # noqa: E402


@pytest.fixture(scope="session", params=family_params(FAMILIES))
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


@pytest.fixture(scope="session")
def stores(tmp_path_factory, sst2_like):
    """Two versions of an sst2 store on a tiny BERT MLM checkpoint, and one store built on another backbone, all
    under one directory (the servers' store root)."""
    from raee.backbones import load_backbone
    from raee.build import build_store
    from raee.calibration import CalibrationSettings
    from raee.data import read_examples
    from raee.keys import KeySpec
    from raee.tasks import BUILTIN_TASKS
    task = BUILTIN_TASKS["sst2"]
    base = tmp_path_factory.mktemp("svc")
    checkpoint = save_checkpoint("bert-mlm", base / "bert")
    backbone = load_backbone(str(checkpoint), runtime="torch")  # torch modules: tests hook its layers
    examples = read_examples(sst2_like, task)
    best = CalibrationSettings(objective="best")  # a tiny store: match-full could only serve full depth
    build_store(base / "sst2", task, backbone, examples[:120], key=KeySpec("prefix", 1), settings=best,
                progress=False)
    build_store(base / "sst2-next", task, backbone, examples[120:], key=KeySpec("prefix", 1), settings=best,
                progress=False)
    other = load_backbone(str(save_checkpoint("llama", base / "llama")), runtime="torch")
    build_store(base / "sst2-llama", task, other, examples[:60], key=KeySpec("prefix", 1), progress=False)
    return {"checkpoint": checkpoint, "backbone": backbone, "root": str(base), "current": str(base / "sst2"),
            "next": str(base / "sst2-next"), "other": str(base / "sst2-llama")}


@pytest.fixture
def serve(stores):
    """serve(**settings) -> a started RaeeServer on 127.0.0.1 (port 0) over the current sst2 store, with an admin
    listener on 127.0.0.1 whose store root holds every test store; stopped after the test."""
    from service.config import ServerConfig
    from service.server import RaeeServer
    started = []

    def start(wait: bool = True, backbone=None, **overrides):
        settings = {"stores": (stores["current"],), "host": "127.0.0.1", "port": 0, "metrics_port": 0,
                    "drain_s": 0.0, "admin": True, "admin_port": 0, "store_roots": (stores["root"],), **overrides}
        server = RaeeServer(ServerConfig(**settings), backbone=backbone or stores["backbone"]).start()
        started.append(server)
        if wait:
            server.loaded.wait(60)
            assert server.load_error is None, server.load_error
        return server

    yield start
    for server in started:
        server.stop(1)
