"""Exit stores on disk: FAISS keys, exit records, item texts and a manifest, written atomically and verified on load.

Layout of a store directory DIR:
    DIR/CURRENT            name of the version in service (replaced atomically with os.replace)
    DIR/v<timestamp>/      one complete version: manifest.json, keys.faiss, records.npz, items.jsonl
A new version is written under a temporary name, fsynced, renamed into place, and only then does CURRENT move to it,
so a crash at any point leaves the previous version serving. The newest few versions are kept for rollback.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import faiss
import numpy as np

from raee.errors import StoreError, StoreMismatchError
from raee.index import IndexSpec, configure_search, read_index
from raee.keys import KeySpec
from raee.calibration import CalibratedPolicy, CalibrationEvidence, CalibrationSettings
from raee.raee_rule import RaeeConfig
from raee.records import ExitRecords
from raee.runtime import DTYPE_PRECISION
from raee.tasks import TaskDefinition

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
DATA_FILES = ("keys.faiss", "records.npz", "items.jsonl")
KEEP_VERSIONS = 3
VERSION_NAME = re.compile(r"v\d{8}T\d{12}Z")  # v<UTC date>T<time to microseconds>Z


@dataclass
class ExitStore:
    """One loaded, verified store version."""

    manifest: dict
    records: ExitRecords
    index: faiss.Index
    texts: list[str]  # calibration item texts, in id order
    lines: np.ndarray  # (N,) line of each item in its source file
    path: Path

    @property
    def task(self) -> TaskDefinition:
        return TaskDefinition.from_dict(self.manifest["task"])

    @property
    def key(self) -> KeySpec:
        return KeySpec.parse(self.manifest["key"])

    @property
    def policy(self) -> RaeeConfig:
        """The store's faithful RAEE settings (what policy `raee` uses)."""
        return RaeeConfig.from_dict(self.manifest["policy"])

    @property
    def calibrated_policy(self) -> CalibratedPolicy:
        """The policy the store serves by default. Stores built before calibration existed serve faithful RAEE."""
        if self.manifest.get("calibrated_policy") is None:
            return CalibratedPolicy(CalibrationSettings(objective="raee"), self.policy, None)
        return CalibratedPolicy.from_dict(self.manifest["calibrated_policy"])

    @property
    def calibration_evidence(self) -> CalibrationEvidence | None:
        """The calibration curve behind the calibrated policy (None for stores built without calibration)."""
        values = self.manifest.get("calibration_evidence")
        return CalibrationEvidence.from_dict(values) if values else None

    @property
    def key_layer(self) -> int:
        """Layers a query has run when its exit is chosen (KeySpec.prefix_layers)."""
        return self.key.prefix_layers

    @property
    def index_spec(self) -> IndexSpec:
        return IndexSpec(**self.manifest["index"]["spec"])

    @property
    def num_layers(self) -> int:
        return int(self.manifest["num_layers"])

    @property
    def version(self) -> str:
        return self.manifest["version"]


def resolve_version(path: str | Path) -> Path:
    """The version directory a path names: itself if it holds a manifest, else the one its CURRENT names."""
    path = Path(path)
    if (path / "manifest.json").is_file():
        return path
    current = path / "CURRENT"
    if current.is_file():
        version = path / current.read_text().strip()
        if not (version / "manifest.json").is_file():
            raise StoreError(f"{path}: CURRENT names {version.name}, which is missing or incomplete")
        return version
    raise StoreError(f"{path}: not an exit store (no manifest.json and no CURRENT); build one with raee-index build")


def load_store(path: str | Path) -> ExitStore:
    """Load and verify a store (checksums, shapes, format). Raises StoreError saying what is wrong."""
    version = resolve_version(path)
    try:
        manifest = json.loads((version / "manifest.json").read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise StoreError(f"{version}/manifest.json is unreadable: {exc}") from None
    if manifest.get("format_version") != FORMAT_VERSION:
        raise StoreError(f"{version}: store format {manifest.get('format_version')!r}; this raee reads "
                         f"format {FORMAT_VERSION}. Rebuild the store.")
    for name in DATA_FILES:
        expected = manifest.get("files", {}).get(name)
        if not (version / name).is_file():
            raise StoreError(f"{version}: {name} is missing")
        actual = sha256_file(version / name)
        if actual != expected:
            raise StoreError(f"{version}: {name} is corrupt (sha256 {actual[:12]}..., manifest says "
                             f"{str(expected)[:12]}...)")
    with np.load(version / "records.npz", allow_pickle=False) as npz:
        records = ExitRecords(npz["gold"], npz["label_logits"],
                              npz["vocab_top2"] if "vocab_top2" in npz.files else None)
        lines = npz["lines"]
    # split on "\n" only: str.splitlines() would also split on U+2028, U+0085 and other separators inside texts
    lines_text = (version / "items.jsonl").read_text(encoding="utf-8").split("\n")
    texts = [json.loads(line)["text"] for line in lines_text if line]
    index = read_index(str(version / "keys.faiss"))
    n, layers = manifest["num_items"], manifest["num_layers"]
    if not (records.num_items == len(texts) == len(lines) == index.ntotal == n) or records.num_layers != layers:
        raise StoreError(f"{version}: parts disagree: manifest {n} items / {layers} layers, records "
                         f"{records.num_items} / {records.num_layers}, index {index.ntotal}, texts {len(texts)}")
    store = ExitStore(manifest, records, index, texts, lines, version)
    configure_search(index, store.index_spec)
    return store


def write_store(root: str | Path, manifest: dict, records: ExitRecords, index: faiss.Index, texts: list[str],
                lines: np.ndarray, keep: int = KEEP_VERSIONS) -> Path:
    """Write a new store version under `root` and make it current, atomically. Returns the version directory."""
    root = Path(root)
    if (root / "manifest.json").exists():
        raise StoreError(f"{root} is a single store version, not a store directory; choose another output")
    foreign = [p.name for p in root.iterdir() if not _store_entry(p.name)] if root.exists() else []
    if foreign:
        raise StoreError(f"{root} exists and is not an exit store (it holds {', '.join(sorted(foreign)[:3])}); "
                         "refusing to write into it")
    root.mkdir(parents=True, exist_ok=True)
    name = "v" + datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S%fZ")
    staging = Path(tempfile.mkdtemp(prefix=".incoming-", dir=root))
    try:
        faiss.write_index(index, str(staging / "keys.faiss"))
        vocab = {} if records.vocab_top2 is None else {"vocab_top2": records.vocab_top2.astype(np.float32)}
        np.savez(staging / "records.npz", gold=records.gold.astype(np.int64),
                 label_logits=records.label_logits.astype(np.float32), lines=np.asarray(lines, dtype=np.int64),
                 **vocab)
        with (staging / "items.jsonl").open("w", encoding="utf-8") as f:
            f.writelines(json.dumps({"text": t}) + "\n" for t in texts)  # ASCII: no raw separators inside lines
        manifest = {**manifest, "format_version": FORMAT_VERSION, "version": name,
                    "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                    "files": {f: sha256_file(staging / f) for f in DATA_FILES}}
        (staging / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
        for f in (*DATA_FILES, "manifest.json"):
            _fsync(staging / f)
        _fsync(staging)
        os.rename(staging, root / name)
        _fsync(root)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    _point_current(root, name)
    _prune(root, keep)
    log.info("wrote store version %s/%s (%d items)", root, name, records.num_items)
    return root / name


def _store_entry(name: str) -> bool:
    """Names a store directory may hold, crashed writes' leftovers included."""
    return name in ("CURRENT", ".CURRENT.tmp") or name.startswith(".incoming-") or bool(VERSION_NAME.fullmatch(name))


def check_compatible(manifest: dict, backbone, embedder=None, allow_precision_mismatch: bool = False) -> None:
    """Raise StoreMismatchError naming every difference between the store's backbone/embedder and the running ones.

    The records' precision must be the running one's (int8 changes per-layer predictions, so int8 records steer
    exits wrongly under fp32 and back); allow_precision_mismatch serves it anyway, with a warning. The runtime may
    differ: torch and onnxruntime at one precision give the same states within float tolerance."""
    built = dict(manifest["backbone"])
    running = backbone.identity()
    if built.get("kind") == "sentence-encoder":
        built.setdefault("pooling", "mean")  # stores from before pooling was saved all mean-pooled
    built.setdefault("precision", DTYPE_PRECISION.get(built.get("dtype", "float32")))  # from before it was saved
    fields = ["kind", "num_layers", "fingerprint", "settings", "pooling"]
    if built["precision"] != running["precision"]:
        if allow_precision_mismatch:
            log.warning("serving a store whose records come from %s with a %s backbone, as asked: exits may differ "
                        "from the calibration's", built["precision"], running["precision"])
        else:
            fields.append("precision")
    diffs = [f"backbone {field}: store has {built.get(field)!r}, running {running.get(field)!r}"
             for field in fields if built.get(field) != running.get(field)]
    if manifest.get("embedder"):
        if embedder is None:
            diffs.append(f"the store's keys come from embedder {manifest['embedder']['source']}, none is loaded")
        elif embedder.fingerprint() != manifest["embedder"]["fingerprint"]:
            diffs.append(f"embedder weights: store has {manifest['embedder']['fingerprint']} "
                         f"({manifest['embedder']['source']}), running {embedder.fingerprint()} ({embedder.source})")
    if diffs:
        advice = (" (serve it at the precision it was built with, --precision, or rebuild it; "
                  "--allow-precision-mismatch serves it anyway)" if "precision" in fields else "")
        raise StoreMismatchError(f"store {manifest.get('task', {}).get('name')} {manifest.get('version')} does not "
                                 "match: " + "; ".join(diffs) + advice)


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _point_current(root: Path, name: str) -> None:
    tmp = root / ".CURRENT.tmp"
    with tmp.open("w") as f:
        f.write(name + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, root / "CURRENT")
    _fsync(root)


def _prune(root: Path, keep: int) -> None:
    current = (root / "CURRENT").read_text().strip()
    versions = sorted(p for p in root.iterdir() if p.is_dir() and VERSION_NAME.fullmatch(p.name))
    for old in versions[:-keep] if keep > 0 else versions:
        if old.name != current:
            shutil.rmtree(old, ignore_errors=True)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)

