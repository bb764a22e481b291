"""Exit stores on disk: round trip, atomic replacement, verification, and refusal of mismatched stores."""

from __future__ import annotations

import json

import numpy as np
import pytest

from raee import store as store_module
from raee.errors import StoreError, StoreMismatchError
from raee.index import IndexSpec, build_index
from raee.records import ExitRecords
from raee.store import check_compatible, load_store, resolve_version, write_store
from raee.backbones import MaskedLMBackbone
from tests.tiny import make_tokenizer, tiny_backbone, tiny_model


def random_store_parts(n=20, layers=3, labels=2, dim=8, seed=0):
    rng = np.random.default_rng(seed)
    records = ExitRecords(rng.integers(0, labels, n), rng.normal(size=(n, layers + 1, labels)).astype(np.float32))
    keys = rng.normal(size=(n, dim)).astype(np.float32)
    keys /= np.linalg.norm(keys, axis=1, keepdims=True)
    manifest = {"task": {"name": "t"}, "num_items": n, "num_layers": layers,
                "index": {"spec": IndexSpec().to_dict()}, "policy": {}}
    return manifest, records, build_index(keys, IndexSpec()), [f"text {i}" for i in range(n)], np.arange(1, n + 1)


def test_round_trip(tmp_path):
    manifest, records, index, texts, lines = random_store_parts()
    version = write_store(tmp_path / "s", manifest, records, index, texts, lines)
    loaded = load_store(tmp_path / "s")
    assert loaded.path == version
    np.testing.assert_array_equal(loaded.records.label_logits, records.label_logits)
    np.testing.assert_array_equal(loaded.records.gold, records.gold)
    assert loaded.texts == texts and loaded.index.ntotal == 20
    assert set(loaded.manifest["files"]) == {"keys.faiss", "records.npz", "items.jsonl"}


def test_texts_with_unicode_line_separators_survive(tmp_path):
    manifest, records, index, texts, lines = random_store_parts(n=4)
    texts = ["a\u2028b", "c\x85d", "e\rf", "g\u2029h"]
    write_store(tmp_path / "s", manifest, records, index, texts, lines)
    assert load_store(tmp_path / "s").texts == texts


def test_new_version_becomes_current_and_old_ones_are_pruned(tmp_path):
    versions = [write_store(tmp_path / "s", *random_store_parts(seed=i)) for i in range(5)]
    assert resolve_version(tmp_path / "s") == versions[-1]
    kept = sorted(p.name for p in (tmp_path / "s").iterdir() if p.is_dir())
    assert kept == [v.name for v in versions[-3:]]


def test_crash_mid_write_leaves_the_previous_version_serving(tmp_path, monkeypatch):
    first = write_store(tmp_path / "s", *random_store_parts(seed=1))

    def crash(*_args, **_kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(store_module.np, "savez", crash)
    with pytest.raises(OSError):
        write_store(tmp_path / "s", *random_store_parts(seed=2))
    monkeypatch.undo()
    assert load_store(tmp_path / "s").path == first
    assert not [p for p in (tmp_path / "s").iterdir() if p.name.startswith(".incoming")]


@pytest.mark.parametrize("damage", ["truncate", "flip", "delete"])
def test_corrupt_files_are_refused(tmp_path, damage):
    version = write_store(tmp_path / "s", *random_store_parts())
    target = version / "records.npz"
    data = target.read_bytes()
    if damage == "truncate":
        target.write_bytes(data[: len(data) // 2])
    elif damage == "flip":
        target.write_bytes(data[:100] + bytes([data[100] ^ 1]) + data[101:])
    else:
        target.unlink()
    with pytest.raises(StoreError, match="records.npz is (corrupt|missing)"):
        load_store(tmp_path / "s")


def test_unknown_format_and_non_stores_are_refused(tmp_path):
    version = write_store(tmp_path / "s", *random_store_parts())
    manifest = json.loads((version / "manifest.json").read_text())
    (version / "manifest.json").write_text(json.dumps({**manifest, "format_version": 99}))
    with pytest.raises(StoreError, match="format 99"):
        load_store(version)
    with pytest.raises(StoreError, match="not an exit store"):
        load_store(tmp_path)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(StoreError, match=r"not an exit store \(it holds notes.txt\); refusing"):
        write_store(tmp_path / "other", *random_store_parts())


def test_a_store_for_other_weights_is_refused_with_the_difference():
    built_on = tiny_backbone("bert-mlm")
    model = tiny_model("bert-mlm")
    with __import__("torch").no_grad():
        next(model.parameters()).add_(1.0)
    other = MaskedLMBackbone(model, make_tokenizer(), source="other weights")
    manifest = {"backbone": built_on.identity(), "task": {"name": "sst2"}, "version": "v1"}
    check_compatible(manifest, built_on)
    with pytest.raises(StoreMismatchError, match="backbone fingerprint"):
        check_compatible(manifest, other)
    with pytest.raises(StoreMismatchError, match="backbone kind"):
        check_compatible(manifest, tiny_backbone("llama"))


def test_leftovers_of_a_crashed_first_write_do_not_block_the_next(tmp_path):
    root = tmp_path / "s"
    (root / ".incoming-abc").mkdir(parents=True)
    (root / "v20260101T000000000000Z").mkdir()  # renamed into place, but CURRENT was never written
    write_store(root, *random_store_parts())
    assert load_store(root).records.num_items == 20


def test_only_version_directories_count_as_store_entries(tmp_path):
    root = tmp_path / "s"
    write_store(root, *random_store_parts())
    (root / "videos").mkdir()  # something of the user's, named like nothing raee writes
    with pytest.raises(StoreError, match="it holds videos"):
        write_store(root, *random_store_parts(seed=1))
    assert (root / "videos").is_dir()  # and pruning never takes it for an old version
