"""The store manifest: what one store version holds and how it was built, as one typed object checked for sense.

A manifest is read from `manifest.json` only after its bytes matched `manifest.sha256`, and every field is checked
here for its type and against the others (the key layer lies within the model, the label count matches the task,
the version is a version name, ...); `raee.store` then checks it against the data files it describes.

Extending it: a new section is a field below, parsed in `from_dict` and written in `to_dict`. A section this raee
does not know yet is kept as written (`extra`) unless the manifest lists it in `requires`: a writer lists a section
there when a reader that ignored it would answer differently (say, a calibrated exit policy), so an older reader
refuses such a store instead of serving it wrongly.
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

from raee.calibration import CalibratedPolicy, CalibrationEvidence, CalibrationSettings
from raee.errors import RaeeError, StoreError
from raee.index import IndexSpec
from raee.keys import KeySpec
from raee.kinds import KINDS, Kind
from raee.raee_rule import RaeeConfig
from raee.runtime import BACKBONE_RUNTIMES, DTYPE_NAMES, PRECISIONS, DType, Precision, Runtime
from raee.tasks import TaskDefinition

FORMAT_VERSION = 2  # 2: manifest.sha256 beside the manifest; file entries carry their size
VERSION_NAME = re.compile(r"v\d{8}T\d{12}Z")  # v<UTC date>T<time to microseconds>Z
DATA_FILES = ("keys.faiss", "records.npz", "items.jsonl")
SHA256 = re.compile(r"[0-9a-f]{64}")
# Sense limits: far past any real store, small enough that sizes derived from them stay meaningful.
MAX_ITEMS = 100_000_000
MAX_LAYERS = 1024
MAX_LABELS = 1024
MAX_KEY_DIM = 65536


@dataclass(frozen=True)
class FileEntry:
    """One data file of a version: its checksum and exact size."""

    sha256: str  # hex digest of the file's bytes
    bytes: int  # size in bytes

    def __post_init__(self) -> None:
        if not (isinstance(self.sha256, str) and SHA256.fullmatch(self.sha256)):
            raise StoreError(f"sha256 {self.sha256!r} is not 64 lower-case hex digits")
        _check_int("bytes", self.bytes, 0, None)


@dataclass(frozen=True)
class BackboneIdentity:
    """The backbone a store was built on (`Backbone.identity()`); a server refuses a store built on other weights."""

    source: str  # "builtin:all-MiniLM-L6-v2" or a checkpoint directory
    kind: Kind
    num_layers: int
    fingerprint: str  # hash of every weight
    dtype: DType
    settings: Mapping[str, Any] = field(default_factory=dict)  # kind settings that change scores (e.g. scale)
    family: str | None = None  # model family adapter (bert, llama, ...)
    runtime: Runtime | None = None  # what ran the layers when the records were made: torch or onnxruntime
    precision: Precision | None = None  # fp32, fp16, bf16 or int8; None in stores from before it was saved: the dtype's
    pooling: str | None = None  # sentence encoders: how token states pool; None in older stores: mean

    def __post_init__(self) -> None:
        _check_str("backbone source", self.source)
        _check_choice("backbone kind", self.kind, KINDS)
        _check_int("backbone num_layers", self.num_layers, 1, MAX_LAYERS)
        _check_str("backbone fingerprint", self.fingerprint)
        _check_choice("backbone dtype", self.dtype, DTYPE_NAMES)
        for name, choices in (("runtime", BACKBONE_RUNTIMES), ("precision", PRECISIONS)):
            if getattr(self, name) is not None:
                _check_choice(f"backbone {name}", getattr(self, name), choices)
        for name in ("family", "pooling"):
            if getattr(self, name) is not None:
                _check_str(f"backbone {name}", getattr(self, name))
        if not isinstance(self.settings, Mapping) or not all(
                isinstance(k, str) and _is_scalar(v) for k, v in self.settings.items()):
            raise StoreError(f"backbone settings must map names to numbers or strings, got {self.settings!r:.80}")

    @classmethod
    def from_dict(cls, spec: Mapping[str, Any]) -> "BackboneIdentity":
        return _build(cls, spec, "backbone")

    def to_dict(self) -> dict[str, Any]:
        """As Backbone.identity() gives it: optional fields only when set."""
        return {k: (dict(v) if k == "settings" else v) for k, v in dataclasses.asdict(self).items()
                if v is not None or k not in OPTIONAL_IDENTITY}


@dataclass(frozen=True)
class EmbedderIdentity:
    """The sentence-transformers model that made the keys, for embedder keys."""

    source: str
    fingerprint: str
    dim: int  # key dimension it gives

    def __post_init__(self) -> None:
        _check_str("embedder source", self.source)
        _check_str("embedder fingerprint", self.fingerprint)
        _check_int("embedder dim", self.dim, 1, MAX_KEY_DIM)

    @classmethod
    def from_dict(cls, spec: Mapping[str, Any]) -> "EmbedderIdentity":
        return _build(cls, spec, "embedder")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class Shard:
    """Part `index` of `count` of one build (raee-index build --shard I/N); merged before serving."""

    index: int
    count: int

    def __post_init__(self) -> None:
        _check_int("shard count", self.count, 1, None)
        _check_int("shard index", self.index, 0, self.count - 1)

    @classmethod
    def from_dict(cls, spec: Mapping[str, Any]) -> "Shard":
        return _build(cls, spec, "shard")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class StoreManifest:
    """Everything a store version says about itself. Built by `raee.build` as a draft (no version, no files);
    `raee.store.write_store` fills in the version, creation time and file entries."""

    task: TaskDefinition
    backbone: BackboneIdentity
    embedder: EmbedderIdentity | None  # set exactly for embedder keys
    key: KeySpec
    key_dim: int  # dimension of the stored keys
    num_layers: int  # layers of the backbone; records hold layers 0..num_layers
    num_items: int  # calibration items in the store
    num_labels: int  # labels of the task; records hold one logit per label
    index: IndexSpec
    policy: RaeeConfig  # the faithful RAEE settings (policy `raee`)
    calibration_settings: CalibrationSettings | None = None  # what the build asked calibration for
    calibrated_policy: CalibratedPolicy | None = None  # served by default; None in shards (merging calibrates)
    calibration_evidence: CalibrationEvidence | None = None  # the leave-one-out curve behind calibrated_policy
    shard: Shard | None = None
    source_file: str | None = None  # calibration file the items came from
    build: Mapping[str, float] = field(default_factory=dict)  # build statistics (seconds, items per second)
    merged_from: tuple[str, ...] = ()  # shard versions a merged store was joined from
    requires: tuple[str, ...] = ()  # sections a reader must understand to serve this store (see module docstring)
    extra: Mapping[str, Any] = field(default_factory=dict)  # sections this raee does not know, kept as written
    version: str = ""  # version directory name; "" in a draft
    created_at: str = ""  # ISO time of writing; "" in a draft
    files: Mapping[str, FileEntry] = field(default_factory=dict)  # data file -> entry; empty in a draft
    format_version: int = FORMAT_VERSION

    def __post_init__(self) -> None:
        for name, kind in (("task", TaskDefinition), ("backbone", BackboneIdentity), ("key", KeySpec),
                           ("index", IndexSpec), ("policy", RaeeConfig)):
            if not isinstance(getattr(self, name), kind):
                raise StoreError(f"{name} must be a {kind.__name__}, got {type(getattr(self, name)).__name__}")
        _check_int("num_layers", self.num_layers, 1, MAX_LAYERS)
        _check_int("num_items", self.num_items, 1, MAX_ITEMS)
        _check_int("num_labels", self.num_labels, 2, MAX_LABELS)
        _check_int("key_dim", self.key_dim, 1, MAX_KEY_DIM)
        if self.format_version != FORMAT_VERSION:
            raise StoreError(f"store format {self.format_version!r}; this raee reads format {FORMAT_VERSION}. "
                             "Rebuild the store with raee-index build.")
        if self.backbone.num_layers != self.num_layers:
            raise StoreError(f"num_layers {self.num_layers} differs from the backbone's {self.backbone.num_layers}")
        if self.num_labels != self.task.num_labels:
            raise StoreError(f"num_labels {self.num_labels} differs from task {self.task.name}'s "
                             f"{self.task.num_labels} labels {list(self.task.labels)}")
        if self.key.prefix_layers > self.num_layers:
            raise StoreError(f"key {self.key} reads layer {self.key.layer} of a {self.num_layers}-layer backbone")
        if (self.key.source == "embedder") != (self.embedder is not None):
            raise StoreError(f"key {self.key} {'needs' if self.embedder is None else 'takes no'} embedder section")
        if self.embedder is not None and self.embedder.dim != self.key_dim:
            raise StoreError(f"key_dim {self.key_dim} differs from the embedder's dimension {self.embedder.dim}")
        sections: tuple[tuple[str, type], ...] = (
            ("calibration_settings", CalibrationSettings), ("calibrated_policy", CalibratedPolicy),
            ("calibration_evidence", CalibrationEvidence))
        for name, section in sections:
            if getattr(self, name) is not None and not isinstance(getattr(self, name), section):
                raise StoreError(f"{name} must be a {section.__name__}, got {type(getattr(self, name)).__name__}")
        if self.calibrated_policy is not None and "calibrated_policy" not in self.requires:
            raise StoreError("a manifest with a calibrated policy must list it in requires (older readers refuse)")
        if self.shard is not None and not isinstance(self.shard, Shard):
            raise StoreError(f"shard must be a Shard, got {type(self.shard).__name__}")
        if self.source_file is not None:
            _check_str("source_file", self.source_file)
        if not all(isinstance(k, str) and _is_number(v) for k, v in self.build.items()):
            raise StoreError(f"build must map names to numbers, got {dict(self.build)!r:.80}")
        if not all(isinstance(v, str) and VERSION_NAME.fullmatch(v) for v in self.merged_from):
            raise StoreError(f"merged_from must list version names, got {list(self.merged_from)!r:.80}")
        if self.version and not (isinstance(self.version, str) and VERSION_NAME.fullmatch(self.version)):
            raise StoreError(f"version {self.version!r:.80} is not a version name like v20260101T000000000000Z")
        if self.files and (set(self.files) != set(DATA_FILES)
                           or not all(isinstance(e, FileEntry) for e in self.files.values())):
            raise StoreError(f"files must list exactly {', '.join(DATA_FILES)}, got {sorted(self.files)}")
        overlap = set(self.extra) & KNOWN_SECTIONS
        if overlap:
            raise StoreError(f"extra sections {sorted(overlap)} shadow known ones")

    @property
    def written(self) -> bool:
        """True once write_store has given it a version and file entries."""
        return bool(self.version and self.files)

    def to_dict(self) -> dict[str, Any]:
        """The JSON form saved as manifest.json (the shape `from_dict` reads)."""
        out: dict[str, Any] = {
            "format_version": self.format_version, "version": self.version, "created_at": self.created_at,
            "task": self.task.to_dict(), "backbone": self.backbone.to_dict(),
            "embedder": self.embedder.to_dict() if self.embedder else None, "key": str(self.key),
            "key_dim": self.key_dim, "num_layers": self.num_layers, "num_items": self.num_items,
            "num_labels": self.num_labels,
            "index": {"spec": self.index.to_dict(), "metric": "inner_product", "normalized": True},
            "policy": self.policy.to_dict(), "calibration_settings": _as_dict(self.calibration_settings),
            "calibrated_policy": _as_dict(self.calibrated_policy),
            "calibration_evidence": _as_dict(self.calibration_evidence),
            "shard": self.shard.to_dict() if self.shard else None,
            "source_file": self.source_file, "build": dict(self.build), "merged_from": list(self.merged_from),
            "requires": list(self.requires),
            "files": {name: dataclasses.asdict(entry) for name, entry in self.files.items()}}
        return {**out, **self.extra}

    @classmethod
    def from_dict(cls, spec: Any) -> "StoreManifest":
        """Parse and check a manifest read from JSON; StoreError names the first field that is wrong."""
        if not isinstance(spec, Mapping):
            raise StoreError(f"a manifest is a JSON object, got {type(spec).__name__}")
        if spec.get("format_version") != FORMAT_VERSION:
            raise StoreError(f"store format {spec.get('format_version')!r}; this raee reads format "
                             f"{FORMAT_VERSION}. Rebuild the store with raee-index build.")
        requires = tuple(_get(spec, "requires", list, default=[]))
        if not all(isinstance(name, str) for name in requires):
            raise StoreError(f"requires must list section names, got {list(requires)!r:.80}")
        unknown = set(spec) - KNOWN_SECTIONS
        needed = sorted(unknown & set(requires))
        if needed:
            raise StoreError(f"the store requires section(s) {needed}, which this raee does not understand; "
                             "upgrade raee or rebuild the store")
        index = _get(spec, "index", dict)
        if index.get("metric") != "inner_product" or index.get("normalized") is not True:
            raise StoreError("index must be searched by inner product over normalised keys")
        embedder = _get(spec, "embedder", (dict, type(None)))
        shard = _get(spec, "shard", (dict, type(None)))
        files = _get(spec, "files", dict)
        settings = _get(spec, "calibration_settings", (dict, type(None)), default=None)
        calibrated = _get(spec, "calibrated_policy", (dict, type(None)), default=None)
        evidence = _get(spec, "calibration_evidence", (dict, type(None)), default=None)
        try:
            return cls(
                task=_task(_get(spec, "task", dict)),
                backbone=BackboneIdentity.from_dict(_get(spec, "backbone", dict)),
                embedder=EmbedderIdentity.from_dict(embedder) if embedder is not None else None,
                key=KeySpec.parse(_get(spec, "key", str)),
                key_dim=_get(spec, "key_dim", int), num_layers=_get(spec, "num_layers", int),
                num_items=_get(spec, "num_items", int), num_labels=_get(spec, "num_labels", int),
                index=_build(IndexSpec, _get(index, "spec", dict), "index spec"),
                policy=_build(RaeeConfig, _get(spec, "policy", dict), "policy"),
                calibration_settings=_section(CalibrationSettings, settings, "calibration_settings"),
                calibrated_policy=_section(CalibratedPolicy, calibrated, "calibrated_policy"),
                calibration_evidence=_section(CalibrationEvidence, evidence, "calibration_evidence"),
                shard=Shard.from_dict(shard) if shard is not None else None,
                source_file=_get(spec, "source_file", (str, type(None)), default=None),
                build=dict(_get(spec, "build", dict, default={})),
                merged_from=tuple(_get(spec, "merged_from", list, default=[])),
                requires=requires,
                extra={name: spec[name] for name in sorted(unknown)},
                version=_get(spec, "version", str), created_at=_get(spec, "created_at", str),
                files={name: _build(FileEntry, _get(files, name, dict), f"files.{name}") for name in files},
                format_version=spec["format_version"])
        except StoreError:
            raise
        except RaeeError as exc:  # a KeySpec, IndexSpec or RaeeConfig refused its values
            raise StoreError(str(exc)) from None


OPTIONAL_IDENTITY = ("family", "runtime", "precision", "pooling")
KNOWN_SECTIONS = frozenset({f.name for f in dataclasses.fields(StoreManifest)} - {"extra"})


def _task(spec: Mapping[str, Any]) -> TaskDefinition:
    """The task section, its JSON types checked before TaskDefinition checks its sense."""
    _get(spec, "name", str)
    labels = _get(spec, "labels", list)
    if not all(isinstance(label, str) for label in labels):
        raise StoreError(f"task labels must be strings, got {labels!r:.80}")
    _get(spec, "metric", str, default=None)
    templates = _get(spec, "template", dict, default={})
    words = _get(spec, "label_words", dict, default={})
    verbalizers = _get(spec, "verbalizers", list, default=[])
    if not (all(isinstance(t, str) for t in templates.values())
            and all(isinstance(w, list) and all(isinstance(x, str) for x in w) for w in words.values())
            and all(isinstance(g, list) and all(isinstance(x, str) for x in g) for g in verbalizers)):
        raise StoreError("task section: templates must be strings, label words and verbalizers lists of strings")
    try:
        return TaskDefinition.from_dict(spec)
    except (RaeeError, TypeError, ValueError) as exc:
        raise StoreError(f"task section: {exc}") from None


def _build(cls: Any, spec: Mapping[str, Any], where: str) -> Any:
    """cls(**spec) for a section of the manifest, with unknown or missing fields and wrong types as StoreError."""
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(spec) - names
    if unknown:
        raise StoreError(f"{where}: unknown field(s) {sorted(unknown)}; this raee knows {sorted(names)}")
    hints = get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name in spec and not _json_type_fits(spec[f.name], hints[f.name]):
            raise StoreError(f"{where}: {f.name} must be {_type_name(hints[f.name])}, got "
                             f"{type(spec[f.name]).__name__} {spec[f.name]!r:.60}")
    try:
        return cls(**spec)
    except StoreError as exc:
        raise StoreError(f"{where}: {exc}") from None
    except (RaeeError, TypeError, ValueError) as exc:
        raise StoreError(f"{where}: {exc}") from None


def _section(cls: Any, spec: Mapping[str, Any] | None, where: str) -> Any:
    """cls.from_dict(spec) for a nested section (None stays None), any malformation as StoreError."""
    if spec is None:
        return None
    try:
        return cls.from_dict(spec)
    except StoreError as exc:
        raise StoreError(f"{where}: {exc}") from None
    except (RaeeError, TypeError, ValueError, KeyError, AttributeError) as exc:
        raise StoreError(f"{where} is malformed ({type(exc).__name__}: {exc}); rebuild the store") from None


def _as_dict(section: Any) -> dict[str, Any] | None:
    return None if section is None else section.to_dict()


def _type_name(hint: Any) -> str:
    """A field's type as a reader would say it: a Literal's choices by name, an optional as "X or null"."""
    if get_origin(hint) is Literal:
        return "one of " + ", ".join(map(str, get_args(hint)))
    if get_origin(hint) in (Union, types.UnionType):
        return " or ".join(_type_name(arg) for arg in get_args(hint))
    return "null" if hint is type(None) else getattr(hint, "__name__", str(hint))


def _json_type_fits(value: Any, hint: Any) -> bool:
    """Whether a JSON value fits a dataclass field's type: int, float, bool, str, Literal choices, mappings and
    optionals; types JSON cannot carry pass (their classes check them)."""
    origin = get_origin(hint)
    if origin is Literal:
        return value in get_args(hint)
    if origin in (Union, types.UnionType):
        return any(_json_type_fits(value, arg) for arg in get_args(hint))
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    if origin is not None and isinstance(origin, type) and issubclass(origin, Mapping) or hint in (dict, Mapping):
        return isinstance(value, Mapping)
    return value is not None


def _get(spec: Mapping[str, Any], name: str, kind: Any, *, default: Any = ...) -> Any:
    if name not in spec:
        if default is not ...:
            return default
        raise StoreError(f"the manifest lacks {name!r}")
    value = spec[name]
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if isinstance(value, bool) and bool not in kinds or not isinstance(value, kinds):
        names = " or ".join("null" if k is type(None) else k.__name__ for k in kinds)
        raise StoreError(f"{name} must be {names}, got {type(value).__name__} {value!r:.60}")
    return value


def _check_int(name: str, value: Any, low: int, high: int | None) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low or (high is not None and value > high):
        bounds = f"{low}..{high}" if high is not None else f">= {low}"
        raise StoreError(f"{name} must be an integer {bounds}, got {value!r:.60}")


def _check_str(name: str, value: Any) -> None:
    if not isinstance(value, str) or not value:
        raise StoreError(f"{name} must be a non-empty string, got {value!r:.60}")


def _check_choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise StoreError(f"{name} {value!r:.60} is not one of {', '.join(choices)}")


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _is_scalar(value: Any) -> bool:
    return _is_number(value) or isinstance(value, (str, bool))


__all__ = ["StoreManifest", "BackboneIdentity", "EmbedderIdentity", "Shard", "FileEntry", "FORMAT_VERSION",
           "VERSION_NAME", "DATA_FILES"]
