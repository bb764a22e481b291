"""Where retrieval keys come from: a sentence-transformers embedder, or the backbone's own early layer ("prefix")."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Literal, get_args

import numpy as np

from raee.backbones.base import fingerprint_module
from raee.backbones.loading import resolve_source
from raee.errors import BackboneError, InputError

log = logging.getLogger(__name__)


KeySource = Literal["embedder", "prefix"]


@dataclass(frozen=True)
class KeySpec:
    """`embedder`: a sentence embedding of the text. `prefix:K`: the backbone's mean-pooled layer-K state, which the
    serving pass computes anyway, so retrieval needs no second model."""

    source: KeySource = "embedder"
    layer: int | None = None  # K, for prefix keys

    def __post_init__(self) -> None:
        if self.source not in get_args(KeySource):
            raise InputError(f"key source {self.source!r} is not 'embedder' or 'prefix:K'")
        if self.source == "prefix" and (self.layer is None or self.layer < 0):
            raise InputError("a prefix key needs a layer: prefix:K with K >= 0")
        if self.source == "embedder" and self.layer is not None:
            raise InputError("an embedder key takes no layer")

    @classmethod
    def parse(cls, text: str) -> "KeySpec":
        if text == "embedder":
            return cls("embedder")
        name, _, layer = text.partition(":")
        if name != "prefix" or not layer.isdigit():
            raise InputError(f"key {text!r} is not 'embedder' or 'prefix:K' (K a layer number)")
        return cls("prefix", int(layer))

    def __str__(self) -> str:
        return "embedder" if self.source == "embedder" else f"prefix:{self.layer}"

    @property
    def prefix_layers(self) -> int:
        """Backbone layers a query has run when its exit is chosen: K for a prefix key, 0 for an embedder key. A
        query's layers run are max(exit layer, prefix_layers)."""
        return self.layer if self.layer is not None else 0  # an embedder key has no layer


AUTO_KEY_LAYERS = (1, 2)  # the prefix keys `auto` chooses between
DEFAULT_KEY = "auto"  # a build's key when none is given: chosen by calibration (README: 'Why the default key')


def parse_key_choice(text: str) -> tuple[KeySpec, ...]:
    """The keys a build may use: one key (`embedder`, `prefix:K`), or `auto` / `auto:K1,K2,...`, prefix keys the
    build calibrates one by one and chooses between (raee.build.choose_key; default prefix:1 and prefix:2)."""
    name, colon, layers = text.partition(":")
    if name != "auto":
        return (KeySpec.parse(text),)
    parts = layers.split(",") if colon else [str(k) for k in AUTO_KEY_LAYERS]
    if not all(p.strip().isdigit() for p in parts):
        raise InputError(f"key {text!r}: auto takes prefix layers, e.g. auto:1,2")
    chosen = sorted({int(p) for p in parts})
    if len(chosen) < 2:
        raise InputError(f"key {text!r}: auto needs two or more prefix layers to choose between (or use prefix:K)")
    return tuple(KeySpec("prefix", k) for k in chosen)


class Embedder:
    """A sentence-transformers model giving unit-length keys (N, D) float32."""

    def __init__(self, source: str | None = None, device: str = "cpu") -> None:
        from sentence_transformers import SentenceTransformer

        self.source, path = resolve_source(source)
        try:
            self.model = SentenceTransformer(str(path), device=device, local_files_only=True)
        except (OSError, ValueError) as exc:
            raise BackboneError(f"{path}: cannot load a sentence-transformers embedder: {exc}") from None
        self._fingerprint: str | None = None

    def fingerprint(self) -> str:
        if self._fingerprint is None:
            self._fingerprint = fingerprint_module(self.model)
        return self._fingerprint

    def identity(self) -> dict[str, Any]:
        return {"source": self.source, "fingerprint": self.fingerprint(),
                "dim": _embedding_dimension(self.model)}

    def encode(self, texts: list[str], batch_size: int = 64) -> np.ndarray:
        keys = self.model.encode(texts, batch_size=batch_size, convert_to_numpy=True, normalize_embeddings=True,
                                 show_progress_bar=False)
        return np.ascontiguousarray(keys, dtype=np.float32)


def require_embedder(embedder: Embedder | None) -> Embedder:
    """The embedder an embedder key needs, or InputError when there is none."""
    if embedder is None:
        raise InputError("embedder keys need an embedder (--embedder, or the store's manifest names one)")
    return embedder


def _embedding_dimension(model: Any) -> int:
    # sentence-transformers 5 renamed get_sentence_embedding_dimension; accept both.
    getter = getattr(model, "get_embedding_dimension", None) or model.get_sentence_embedding_dimension
    return int(getter())
