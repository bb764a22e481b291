"""Exit stores on disk: round trip, atomic replacement, verification, and refusal of mismatched, edited, oversized,
unreadable or swapped stores; pruning that keeps the versions that served."""

from __future__ import annotations

import builtins
import dataclasses
import hashlib
import io
import json
import os
import stat
import threading
import time

import numpy as np
import pytest

from raee import store as store_module
from raee import versions as versions_module
from raee.backbones import MaskedLMBackbone
from raee.errors import StoreError, StoreMismatchError
from raee.index import IndexSpec, build_index
from raee.keys import KeySpec
from raee.manifest import BackboneIdentity, StoreManifest
from raee.raee_rule import RaeeConfig
from raee.records import ExitRecords
from raee.store import check_compatible, load_store, resolve_version, write_store
from raee.tasks import BUILTIN_TASKS
from tests.tiny import make_tokenizer, tiny_backbone, tiny_model


def synthetic_manifest(n=20, layers=3, dim=8, task="sst2") -> StoreManifest:
    return StoreManifest(task=BUILTIN_TASKS[task], backbone=BackboneIdentity("tiny", "masked-lm", layers, "f" * 32,
                                                                            "float32"),
                         embedder=None, key=KeySpec("prefix", 1), key_dim=dim, num_layers=layers, num_items=n,
                         num_labels=BUILTIN_TASKS[task].num_labels, index=IndexSpec(), policy=RaeeConfig())


def random_store_parts(n=20, layers=3, dim=8, seed=0):
    rng = np.random.default_rng(seed)
    records = ExitRecords(rng.integers(0, 2, n), rng.normal(size=(n, layers + 1, 2)).astype(np.float32))
    keys = rng.normal(size=(n, dim)).astype(np.float32)
    keys /= np.linalg.norm(keys, axis=1, keepdims=True)
    texts = [f"text {i}" for i in range(n)]
    return synthetic_manifest(n, layers, dim), records, build_index(keys, IndexSpec()), texts, np.arange(1, n + 1)


def edit_manifest(version, change, *, rehash=True):
    """Change manifest.json as a hand would; with rehash, also update manifest.sha256 to match."""
    spec = json.loads((version / "manifest.json").read_text())
    change(spec)
    data = json.dumps(spec).encode()
    (version / "manifest.json").write_bytes(data)
    if rehash:
        (version / "manifest.sha256").write_text(hashlib.sha256(data).hexdigest() + "\n")


def add_neutral_label(task: dict) -> None:
    task["labels"].append("neutral")
    for words in task["label_words"].values():
        words.append("okay")
    task["verbalizers"].append(["It was okay."])


def test_round_trip(tmp_path):
    manifest, records, index, texts, lines = random_store_parts()
    version = write_store(tmp_path / "s", manifest, records, index, texts, lines)
    loaded = load_store(tmp_path / "s")
    assert loaded.path == version and loaded.version == version.name
    np.testing.assert_array_equal(loaded.records.label_logits, records.label_logits)
    np.testing.assert_array_equal(loaded.records.gold, records.gold)
    assert loaded.texts == texts and loaded.index.ntotal == 20
    assert set(loaded.manifest.files) == {"keys.faiss", "records.npz", "items.jsonl"}
    assert StoreManifest.from_dict(loaded.manifest.to_dict()) == loaded.manifest


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
    assert (tmp_path / "s" / "HISTORY").read_text().split() == [v.name for v in versions]


def test_crash_mid_write_leaves_the_previous_version_serving(tmp_path, monkeypatch):
    first = write_store(tmp_path / "s", *random_store_parts(seed=1))

    def crash(*_args, **_kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(store_module, "write_synced", crash)
    with pytest.raises(StoreError, match="cannot write the store: No space left on device"):
        write_store(tmp_path / "s", *random_store_parts(seed=2))
    monkeypatch.undo()
    assert load_store(tmp_path / "s").path == first
    assert not [p for p in (tmp_path / "s").iterdir() if p.name.startswith(".incoming")]


def test_builds_killed_after_the_rename_never_cost_the_serving_version(tmp_path, monkeypatch):
    """Versions renamed into place but never made CURRENT must not count toward the versions kept."""
    serving = write_store(tmp_path / "s", *random_store_parts(seed=0))

    def killed(*_args, **_kwargs):
        raise OSError(9, "killed")

    monkeypatch.setattr(store_module, "point_current", killed)
    for seed in range(1, 5):
        with pytest.raises(StoreError):
            write_store(tmp_path / "s", *random_store_parts(seed=seed))
    monkeypatch.undo()
    assert load_store(tmp_path / "s").path == serving  # the killed builds never served
    good = write_store(tmp_path / "s", *random_store_parts(seed=9))
    names = sorted(p.name for p in (tmp_path / "s").iterdir() if p.is_dir())
    assert names == [serving.name, good.name]  # the rollback target is kept; the never-promoted leftovers are gone


def test_stale_staging_dirs_are_cleaned_at_the_next_write(tmp_path):
    root = tmp_path / "s"
    write_store(root, *random_store_parts())
    (root / ".incoming-crashed").mkdir()
    (root / ".incoming-crashed" / "keys.faiss").write_bytes(b"half")
    write_store(root, *random_store_parts(seed=1))
    assert not [p for p in root.iterdir() if p.name.startswith(".incoming")]


def test_directories_and_files_follow_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        version = write_store(tmp_path / "s", *random_store_parts())
    finally:
        os.umask(old)
    assert stat.S_IMODE(version.stat().st_mode) == 0o755  # readable by a server running as another user
    assert stat.S_IMODE((version / "records.npz").stat().st_mode) == 0o644
    old = os.umask(0o077)
    try:
        private = write_store(tmp_path / "p", *random_store_parts())
    finally:
        os.umask(old)
    assert stat.S_IMODE(private.stat().st_mode) == 0o700


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


def test_a_hand_edited_manifest_is_refused_by_its_checksum(tmp_path):
    version = write_store(tmp_path / "s", *random_store_parts())
    edit_manifest(version, lambda m: m["policy"].update(k=3), rehash=False)
    with pytest.raises(StoreError, match="does not match manifest.sha256"):
        load_store(tmp_path / "s")
    (version / "manifest.sha256").unlink()
    with pytest.raises(StoreError, match="manifest.sha256 is missing"):
        load_store(tmp_path / "s")


@pytest.mark.parametrize("change, message", [
    (lambda m: m.update(key="prefix:9"), "key prefix:9 reads layer 9 of a 3-layer backbone"),
    (lambda m: add_neutral_label(m["task"]), "num_labels 2 differs from task sst2.s 3 labels"),
    (lambda m: (add_neutral_label(m["task"]), m.update(num_labels=3)), r"parts disagree.*3 labels"),
    (lambda m: m.update(version="../../../etc/passwd"), "is not a version name"),
    (lambda m: m.update(version="v20200101T000000000000Z"), "the directory is named"),
    (lambda m: m.update(num_items=[20]), "num_items must be int, got list"),
    (lambda m: m.pop("backbone"), "lacks 'backbone'"),
    (lambda m: m["policy"].update(tau="high"), "policy: tau must be float"),
    (lambda m: m["policy"].update(k=0), "k must be an integer in 1..1024"),
    (lambda m: m["index"]["spec"].update(type="annoy"),
     "type must be one of flat, flat-fp16, hnsw, ivf, got str 'annoy'"),
    (lambda m: m.update(num_layers=4), "num_layers 4 differs from the backbone's 3"),
    (lambda m: m["backbone"].update(kind="rnn"), "kind must be one of masked-lm, .*, got str 'rnn'"),
    (lambda m: m["task"].update(labels="np"), "labels must be list"),
    (lambda m: m.update(num_items=10**12), "num_items must be an integer"),
    (lambda m: m["files"]["records.npz"].update(sha256=7), "sha256 must be str"),
    (lambda m: m.update(future_policy={"a": 1}, requires=["future_policy"]),
     r"requires section\(s\) \['future_policy'\]"),
    (lambda m: m.update(calibrated_policy={"a": 1}, requires=["calibrated_policy"]), "calibrated policy is malformed"),
])
def test_a_manifest_that_makes_no_sense_is_refused_as_a_store_error(tmp_path, change, message):
    version = write_store(tmp_path / "s", *random_store_parts())
    edit_manifest(version, change)
    with pytest.raises(StoreError, match=message):
        load_store(tmp_path / "s")


def test_unknown_optional_sections_are_kept_as_written(tmp_path):
    version = write_store(tmp_path / "s", *random_store_parts())
    edit_manifest(version, lambda m: m.update(calibration_notes={"note": "from a newer raee"}))
    store = load_store(tmp_path / "s")
    assert store.manifest.extra == {"calibration_notes": {"note": "from a newer raee"}}
    assert store.manifest.to_dict()["calibration_notes"] == {"note": "from a newer raee"}


@pytest.mark.parametrize("current", ["/etc", "../other/v20260101T000000000000Z", "v1", ""])
def test_current_must_name_a_version_inside_the_store(tmp_path, current):
    write_store(tmp_path / "s", *random_store_parts())
    outside = write_store(tmp_path / "other", *random_store_parts(seed=1))
    (tmp_path / "s" / "CURRENT").write_text(current.replace("v20260101T000000000000Z", outside.name) + "\n")
    with pytest.raises(StoreError, match="not a version name"):
        load_store(tmp_path / "s")


def test_a_file_past_its_size_limit_is_refused_before_it_is_read(tmp_path):
    version = write_store(tmp_path / "s", *random_store_parts())
    limit = store_module.file_limits(load_store(tmp_path / "s").manifest)["items.jsonl"]
    with (version / "items.jsonl").open("ab") as f:  # sparse: a huge file that costs no disk
        f.truncate(limit + 1)
    size = (version / "items.jsonl").stat().st_size
    edit_manifest(version, lambda m: m["files"]["items.jsonl"].update(bytes=size))
    with pytest.raises(StoreError, match=f"items.jsonl: the manifest gives {size} bytes, past the {limit}"):
        load_store(tmp_path / "s")


def open_failing_for(monkeypatch, name, error, under=None):
    """Make every open() (and os.open) of a file called `name` (below the directory `under`, if given) raise `error`
    (root can read any file, so chmod cannot)."""
    def failing(real):
        def fake(file, *args, **kwargs):
            if isinstance(file, (str, os.PathLike)) and os.path.basename(os.fspath(file)) == name and (
                    under is None or os.fspath(file).startswith(str(under))):
                raise error
            return real(file, *args, **kwargs)
        return fake

    monkeypatch.setattr(builtins, "open", failing(builtins.open))
    monkeypatch.setattr(io, "open", failing(io.open))
    monkeypatch.setattr(os, "open", failing(os.open))


@pytest.mark.parametrize("name", ["records.npz", "manifest.json", "CURRENT"])
def test_an_unreadable_file_is_a_store_error(tmp_path, monkeypatch, name):
    write_store(tmp_path / "s", *random_store_parts())
    open_failing_for(monkeypatch, name, PermissionError(13, "Permission denied", name))
    with pytest.raises(StoreError, match="Permission denied"):
        load_store(tmp_path / "s")


def test_a_file_deleted_during_verification_is_a_store_error_or_loads_whole(tmp_path, monkeypatch):
    version = write_store(tmp_path / "s", *random_store_parts())
    real = os.open  # store files are opened with os.open (raee.versions.open_regular)

    def open_then_delete(file, *args, **kwargs):
        handle = real(file, *args, **kwargs)
        if isinstance(file, (str, os.PathLike)) and os.path.basename(os.fspath(file)) == "records.npz":
            os.unlink(file)  # gone right after its first open: a second read finds nothing
        return handle

    monkeypatch.setattr(os, "open", open_then_delete)
    try:
        store = load_store(version)
        assert store.records.num_items == 20  # read once, whole, from the handle that was open
    except StoreError as exc:
        assert "records.npz" in str(exc)
    monkeypatch.undo()
    with pytest.raises(StoreError, match="records.npz is missing"):
        load_store(version)


def test_a_file_swapped_during_verification_is_never_served(tmp_path):
    """Checksums and parsing read the same bytes: a swap mid-load gives the checked file or an error."""
    version = write_store(tmp_path / "s", *random_store_parts(n=4000, seed=1))
    other = write_store(tmp_path / "o", *random_store_parts(n=4000, seed=2))
    good = load_store(version).records.label_logits
    a, b = (version / "records.npz").read_bytes(), (other / "records.npz").read_bytes()
    stop = threading.Event()

    def swap():
        for i in range(10**9):
            if stop.is_set():
                return
            (version / "records.tmp").write_bytes(b if i % 2 == 0 else a)
            os.replace(version / "records.tmp", version / "records.npz")

    swapper = threading.Thread(target=swap)
    swapper.start()
    outcomes = []
    try:
        for _ in range(60):
            try:
                store = load_store(version)
                outcomes.append("ok")
                np.testing.assert_array_equal(store.records.label_logits, good)
            except StoreError:
                outcomes.append("refused")
    finally:
        stop.set()
        swapper.join()
    assert "refused" in outcomes  # the swap was seen at least once


def test_unknown_format_and_non_stores_are_refused(tmp_path):
    version = write_store(tmp_path / "s", *random_store_parts())
    edit_manifest(version, lambda m: m.update(format_version=99))
    with pytest.raises(StoreError, match="format 99"):
        load_store(version)
    with pytest.raises(StoreError, match="not an exit store"):
        load_store(tmp_path)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(StoreError, match=r"not an exit store \(it holds notes.txt\); refusing"):
        write_store(tmp_path / "other", *random_store_parts())


def test_an_unwritable_output_is_one_store_error(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(StoreError, match="cannot write the store: Not a directory"):
        store_module.check_store_root(tmp_path / "file" / "s")


def test_a_store_for_other_weights_is_refused_with_the_difference():
    built_on = tiny_backbone("bert-mlm")
    model = tiny_model("bert-mlm")
    with __import__("torch").no_grad():
        next(model.parameters()).add_(1.0)
    other = MaskedLMBackbone(model, make_tokenizer(), source="other weights")
    manifest = dataclasses.replace(synthetic_manifest(), backbone=BackboneIdentity.from_dict(built_on.identity()))
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


def test_versions_of_a_store_written_before_history_count_as_promoted(tmp_path):
    root = tmp_path / "s"
    old = [write_store(root, *random_store_parts(seed=i)) for i in range(2)]
    (root / "HISTORY").unlink()  # as an older raee left it
    new = write_store(root, *random_store_parts(seed=5))
    assert sorted(p.name for p in root.iterdir() if p.is_dir()) == [old[0].name, old[1].name, new.name]
    assert versions_module.KEEP_VERSIONS == 3


@pytest.mark.parametrize("name", ["manifest.sha256", "manifest.json", "records.npz", "CURRENT"])
def test_a_fifo_in_place_of_a_store_file_is_refused_at_once(tmp_path, name):
    """Opening a FIFO for reading waits for a writer: a reload of such a version hung, and every reload after it."""
    root = tmp_path / "s"
    version = write_store(root, *random_store_parts())
    where = root / name if name == "CURRENT" else version / name
    where.unlink()
    os.mkfifo(where)
    started = time.monotonic()
    with pytest.raises(StoreError) as refused:
        load_store(root)
    assert time.monotonic() - started < 5
    if name.startswith("manifest.sha") or name == "records.npz":  # the others are found missing before opening
        assert "not a regular file" in str(refused.value)
