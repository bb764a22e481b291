"""Exit stores on disk: FAISS keys, exit records, item texts and a manifest, written atomically and verified on load.

A version directory holds manifest.json, manifest.sha256, keys.faiss, records.npz and items.jsonl. A new version is
written under a temporary name, fsynced, renamed into place, and only then does CURRENT move to it, so a crash at
any point leaves the previous version serving (raee.versions keeps the store directory: CURRENT, HISTORY, pruning).

Verification chains from manifest.sha256 to the manifest, whose file entries give each data file's size and
checksum. Every file is read once, within a size limit, and hashed and parsed from the same bytes, so a file swapped
mid-load cannot pass the check and be served. Any failure to read, OSError included, is a StoreError.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import logging
import math
import os
import secrets
import shutil
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING

import faiss
import numpy as np

from raee.calibration import CalibratedPolicy, CalibrationEvidence, CalibrationSettings
from raee.errors import StoreError, StoreMismatchError
from raee.index import IndexSpec, configure_search, deserialize_index, index_type_of
from raee.keys import Embedder, KeySpec
from raee.manifest import DATA_FILES, FileEntry, StoreManifest
from raee.raee_rule import RaeeConfig
from raee.records import ExitRecords
from raee.runtime import DTYPE_PRECISION
from raee.tasks import TaskDefinition

if TYPE_CHECKING:
    from raee.backbones.base import Backbone
from raee.versions import (
    KEEP_VERSIONS,
    MAX_POINTER_BYTES,
    check_store_root,
    fsync,
    new_version_name,
    open_regular,
    point_current,
    prune,
    read_small,
    remove_stale_staging,
    resolve_version,
    store_error,
    write_synced,
    writer_lock,
)

log = logging.getLogger(__name__)

MAX_MANIFEST_BYTES = 1 << 20
MAX_ITEM_BYTES = 16 << 10  # average bytes per line of items.jsonl; calibration texts are a few hundred
CHUNK = 1 << 20
Check = Callable[[], None]  # called between chunks of a load; raises to abandon it (a cancelled reload)


@dataclass
class ExitStore:
    """One loaded, verified store version."""

    manifest: StoreManifest
    records: ExitRecords
    index: faiss.Index
    texts: list[str]  # calibration item texts, in id order
    lines: np.ndarray  # (N,) line of each item in its source file
    path: Path

    @property
    def task(self) -> TaskDefinition:
        return self.manifest.task

    @property
    def key(self) -> KeySpec:
        return self.manifest.key

    @property
    def policy(self) -> RaeeConfig:
        """The store's faithful RAEE settings (what policy `raee` uses)."""
        return self.manifest.policy

    @property
    def calibrated_policy(self) -> CalibratedPolicy:
        """The policy the store serves by default. Stores built before calibration existed serve faithful RAEE."""
        if self.manifest.calibrated_policy is None:
            return CalibratedPolicy(CalibrationSettings(objective="raee"), self.policy, None)
        return self.manifest.calibrated_policy

    @property
    def calibration_evidence(self) -> CalibrationEvidence | None:
        """The calibration curve behind the calibrated policy (None for shards and stores built without it)."""
        return self.manifest.calibration_evidence

    @property
    def key_layer(self) -> int:
        """Layers a query has run when its exit is chosen (KeySpec.prefix_layers)."""
        return self.key.prefix_layers

    @property
    def index_spec(self) -> IndexSpec:
        return self.manifest.index

    @property
    def num_layers(self) -> int:
        return self.manifest.num_layers

    @property
    def version(self) -> str:
        return self.manifest.version


# -- reading ---------------------------------------------------------------------------------------------------
def load_store(path: str | Path, check: Check | None = None) -> ExitStore:
    """Load and verify a store (checksums, sizes, manifest sense, shapes). Raises StoreError saying what is wrong.

    check: called between chunks read; it may raise to abandon the load (a reload whose deadline passed)."""
    check = check or (lambda: None)
    version = resolve_version(path)
    manifest = read_manifest(version)
    limits = file_limits(manifest)
    data = {name: _read_verified(version, name, manifest.files[name], limits[name], check) for name in DATA_FILES}
    records, lines = _parse_records(version, data.pop("records.npz"))
    texts = _parse_items(version, data.pop("items.jsonl"))
    index = deserialize_index(data.pop("keys.faiss"), f"{version}/keys.faiss")
    _check_parts(version, manifest, records, lines, texts, index)
    configure_search(index, manifest.index)
    return ExitStore(manifest, records, index, texts, lines, version)


def read_manifest(version: Path) -> StoreManifest:
    """The manifest of a version directory, checked against manifest.sha256 and for sense."""
    try:
        digest = read_small(version / "manifest.sha256", MAX_POINTER_BYTES).decode("ascii", "replace").strip()
        data = read_small(version / "manifest.json", MAX_MANIFEST_BYTES)
    except FileNotFoundError as exc:
        raise StoreError(f"{version}: {Path(exc.filename).name} is missing; rebuild the store") from None
    except OSError as exc:
        raise store_error(version, exc) from None
    if hashlib.sha256(data).hexdigest() != digest:
        raise StoreError(f"{version}/manifest.json does not match manifest.sha256: it was edited or is corrupt")
    try:
        spec = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise StoreError(f"{version}/manifest.json is not valid JSON: {exc}") from None
    try:
        manifest = StoreManifest.from_dict(spec)
    except StoreError as exc:
        raise StoreError(f"{version}/manifest.json: {exc}") from None
    if not manifest.written:
        raise StoreError(f"{version}/manifest.json has no version or file entries")
    if manifest.version != version.name:
        raise StoreError(f"{version}: the manifest says version {manifest.version!r:.80}, the directory is named "
                         f"{version.name!r}; a version directory keeps the name it was written with")
    return manifest


def file_limits(manifest: StoreManifest) -> dict[str, int]:
    """Most bytes each data file may hold, from the manifest's counts: a file past it is refused unread."""
    n, d, layers, labels = manifest.num_items, manifest.key_dim, manifest.num_layers, manifest.num_labels
    spec = manifest.index
    nlist = max(spec.nlist or 0, int(4 * math.sqrt(n)) + 1)
    return {
        # header and ids; HNSW adds about 2M neighbour ids per key; IVF adds its centroids
        "keys.faiss": n * (4 * d + 16 + 12 * spec.hnsw_m) + 4 * d * nlist + (1 << 20),
        "records.npz": n * (16 + 4 * (layers + 1) * (labels + 2)) + (64 << 10),  # + vocab_top2 for LMs
        "items.jsonl": n * MAX_ITEM_BYTES + (1 << 20),
    }


def _read_verified(version: Path, name: str, entry: FileEntry, limit: int, check: Check) -> bytearray:
    """A data file's bytes, read once: its size checked before reading and its checksum over exactly these bytes."""
    path = version / name
    if entry.bytes > limit:
        raise StoreError(f"{path}: the manifest gives {entry.bytes} bytes, past the {limit} a store of this size "
                         "can hold")
    try:
        with open_regular(path) as f:
            size = os.fstat(f.fileno()).st_size
            if size != entry.bytes:
                raise StoreError(f"{version}: {name} is corrupt ({size} bytes, the manifest says {entry.bytes})")
            data, digest, done = bytearray(size), hashlib.sha256(), 0
            view = memoryview(data)
            while done < size:
                got = f.readinto(view[done:done + CHUNK])
                if not got:
                    break
                digest.update(view[done:done + got])
                done += got
                check()
            view.release()
            if done != size or f.read(1):
                raise StoreError(f"{version}: {name} changed size while it was read")
    except FileNotFoundError:
        raise StoreError(f"{version}: {name} is missing") from None
    except OSError as exc:
        raise store_error(path, exc) from None
    actual = digest.hexdigest()
    if actual != entry.sha256:
        raise StoreError(f"{version}: {name} is corrupt (sha256 {actual[:12]}..., manifest says "
                         f"{entry.sha256[:12]}...)")
    return data


def _parse_records(version: Path, data: bytearray) -> tuple[ExitRecords, np.ndarray]:
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as npz:
            gold, logits, lines = npz["gold"], npz["label_logits"], npz["lines"]
            vocab = npz["vocab_top2"] if "vocab_top2" in npz.files else None
    except (ValueError, KeyError, OSError, EOFError, zipfile.BadZipFile) as exc:
        raise StoreError(f"{version}/records.npz is not a records file: {exc}") from None
    if not (np.issubdtype(gold.dtype, np.integer) and np.issubdtype(lines.dtype, np.integer)
            and np.issubdtype(logits.dtype, np.floating)):
        raise StoreError(f"{version}/records.npz holds arrays of the wrong types ({gold.dtype}, {logits.dtype}, "
                         f"{lines.dtype})")
    if vocab is not None and not np.issubdtype(vocab.dtype, np.floating):
        raise StoreError(f"{version}/records.npz holds vocabulary probabilities of type {vocab.dtype}")
    return ExitRecords(gold, logits, vocab), lines


def _parse_items(version: Path, data: bytearray) -> list[str]:
    texts = []
    try:
        # split on "\n" only: str.splitlines() would also split on U+2028, U+0085 and other separators inside texts
        for number, line in enumerate(data.decode("utf-8").split("\n"), start=1):
            if line:
                item = json.loads(line)
                if not (isinstance(item, dict) and isinstance(item.get("text"), str)):
                    raise ValueError(f"line {number} is not an object with a text")
                texts.append(item["text"])
    except ValueError as exc:  # UnicodeDecodeError and JSONDecodeError included
        raise StoreError(f"{version}/items.jsonl is not an items file: {exc}") from None
    return texts


def _check_parts(version: Path, m: StoreManifest, records: ExitRecords, lines: np.ndarray, texts: list[str],
                 index: faiss.Index) -> None:
    """Every part agrees with the manifest: counts, layers, labels, key dimension and index type."""
    shape = (m.num_items, m.num_layers + 1, m.num_labels)
    if records.label_logits.shape != shape or lines.shape != (m.num_items,) or len(texts) != m.num_items:
        raise StoreError(f"{version}: parts disagree with the manifest ({m.num_items} items, {m.num_layers} layers, "
                         f"{m.num_labels} labels): records {records.label_logits.shape}, lines {lines.shape}, "
                         f"texts {len(texts)}")
    if index.ntotal != m.num_items or index.d != m.key_dim or index_type_of(index) != m.index.type:
        raise StoreError(f"{version}: keys.faiss holds {index.ntotal} {index.d}-d keys in a "
                         f"{index_type_of(index)} index; the manifest says {m.num_items} {m.key_dim}-d, "
                         f"{m.index.type}")


# -- writing ---------------------------------------------------------------------------------------------------
def write_store(root: str | Path, manifest: StoreManifest, records: ExitRecords, index: faiss.Index, texts: list[str],
                lines: np.ndarray, keep: int = KEEP_VERSIONS, promote: bool = True) -> Path:
    """Write a new store version under `root` and make it current, atomically. Returns the version directory.

    promote=False writes the version without switching CURRENT (a rollout switches it once every replica serves
    it: raee-admin rollout); the first version of a store is made current all the same, as nothing serves yet.

    Directories and files follow the umask. OSError (disk full, read-only, no permission) becomes StoreError; the
    previous version keeps serving."""
    root = Path(root)
    staging: Path | None = None
    try:
        check_store_root(root)
        with writer_lock(root) as locked:
            remove_stale_staging(root, locked)
            name = new_version_name(root)
            staging = root / f".incoming-{secrets.token_hex(6)}"
            staging.mkdir()  # mode 0777 less the umask, unlike mkdtemp's 0700
            contents = {"keys.faiss": faiss.serialize_index(index).tobytes(),
                        "records.npz": _records_bytes(records, lines), "items.jsonl": _items_bytes(texts)}
            entries = {f: FileEntry(hashlib.sha256(b).hexdigest(), len(b)) for f, b in contents.items()}
            manifest = dataclasses.replace(manifest, version=name, files=entries,
                                           created_at=datetime.now(timezone.utc).isoformat(timespec="seconds"))
            _check_sizes(manifest)
            manifest_bytes = (json.dumps(manifest.to_dict(), indent=2) + "\n").encode("utf-8")
            contents["manifest.json"] = manifest_bytes
            contents["manifest.sha256"] = (hashlib.sha256(manifest_bytes).hexdigest() + "\n").encode("ascii")
            for file, data in contents.items():
                write_synced(staging / file, data)
            fsync(staging)
            os.rename(staging, root / name)
            staging = None
            fsync(root)
            if promote or not (root / "CURRENT").is_file():
                point_current(root, name)
                prune(root, keep)
    except OSError as exc:
        raise store_error(root, exc, "cannot write the store") from None
    finally:
        if staging is not None and staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    log.info("wrote store version %s/%s (%d items)%s", root, name, records.num_items,
             "" if (root / "CURRENT").read_text().strip() == name else "; CURRENT unchanged")
    return root / name


def _records_bytes(records: ExitRecords, lines: np.ndarray) -> bytes:
    out = io.BytesIO()
    vocab = {} if records.vocab_top2 is None else {"vocab_top2": records.vocab_top2.astype(np.float32)}
    arrays: dict[str, np.ndarray] = {"gold": records.gold.astype(np.int64),
                                     "label_logits": records.label_logits.astype(np.float32),
                                     "lines": np.asarray(lines, dtype=np.int64), **vocab}
    np.savez(out, **arrays)  # type: ignore[arg-type]  # numpy's stub types **kwds as the allow_pickle flag
    return out.getvalue()


def _items_bytes(texts: list[str]) -> bytes:
    # ASCII JSON: no raw separators inside lines
    return "".join(json.dumps({"text": t}) + "\n" for t in texts).encode("ascii")


def _check_sizes(manifest: StoreManifest) -> None:
    """Refuse to write a version that load_store would refuse for its size."""
    limits = file_limits(manifest)
    for name, entry in manifest.files.items():
        if entry.bytes > limits[name]:
            raise StoreError(f"{name} would be {entry.bytes} bytes, past the {limits[name]} a store of "
                             f"{manifest.num_items} items may hold (items average at most {MAX_ITEM_BYTES} bytes)")


# -- compatibility ---------------------------------------------------------------------------------------------
def check_compatible(manifest: StoreManifest, backbone: Backbone, embedder: Embedder | None = None,
                     allow_precision_mismatch: bool = False) -> None:
    """Raise StoreMismatchError naming every difference between the store's backbone/embedder and the running ones.

    The records' precision must be the running one's (int8 changes per-layer predictions, so int8 records steer
    exits wrongly under fp32 and back); allow_precision_mismatch serves it anyway, with a warning. The runtime may
    differ: torch and onnxruntime at one precision give the same states within float tolerance."""
    built = manifest.backbone.to_dict()
    running = backbone.identity()
    if built.get("kind") == "sentence-encoder" and built.get("pooling") is None:
        built["pooling"] = "mean"  # stores from before pooling was saved all mean-pooled
    if built.get("precision") is None:
        built["precision"] = DTYPE_PRECISION.get(built["dtype"])  # from before it was saved
    fields = ["kind", "num_layers", "fingerprint", "settings", "pooling"]
    if built["precision"] != running["precision"]:
        if allow_precision_mismatch:
            log.warning("serving a store whose records come from %s with a %s backbone, as asked: exits may differ "
                        "from the calibration's", built["precision"], running["precision"])
        else:
            fields.append("precision")
    diffs = [f"backbone {field}: store has {built.get(field)!r}, running {running.get(field)!r}"
             for field in fields if built.get(field) != running.get(field)]
    if manifest.embedder is not None:
        if embedder is None:
            diffs.append(f"the store's keys come from embedder {manifest.embedder.source}, none is loaded")
        elif embedder.fingerprint() != manifest.embedder.fingerprint:
            diffs.append(f"embedder weights: store has {manifest.embedder.fingerprint} ({manifest.embedder.source}), "
                         f"running {embedder.fingerprint()} ({embedder.source})")
    if diffs:
        advice = (" (serve it at the precision it was built with, --precision, or rebuild it; "
                  "--allow-precision-mismatch serves it anyway)" if "precision" in fields else "")
        raise StoreMismatchError(f"store {manifest.task.name} {manifest.version} does not match: " + "; ".join(diffs)
                                 + advice)
