"""Serving-time classification: key, retrieve, choose an exit layer, run the backbone only that far."""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from raee.backbones.base import Backbone, mean_pool
from raee.backbones.loading import load_backbone
from raee.errors import InputError, StoreMismatchError
from raee.index import on_best_device, search
from raee.keys import Embedder
from raee.manifest import StoreManifest
from raee.policy import RaeeConfig, exit_layers_from_scores, layer_scores
from raee.records import softmax
from raee.store import ExitStore, check_compatible, load_store

log = logging.getLogger(__name__)

@dataclass(frozen=True)
class StageTimes:
    """Wall time of each stage for the batch a text was classified in, in milliseconds. With a prefix key, `key`
    includes the backbone's first K layers, which the backbone stage then does not repeat."""

    key_ms: float
    search_ms: float
    backbone_ms: float

    @property
    def total_ms(self) -> float:
        return self.key_ms + self.search_ms + self.backbone_ms


@dataclass(frozen=True)
class Neighbour:
    id: int  # item id in the exit store
    similarity: float  # cosine similarity to the query


@dataclass(frozen=True)
class Classification:
    label: str
    label_index: int
    scores: tuple[float, ...]  # probability per label at the exit layer
    exit_layer: int  # layer whose head answered (0 = embeddings)
    layers_run: int  # layers actually computed (a prefix key computes at least K)
    num_layers: int
    times: StageTimes
    neighbours: tuple[Neighbour, ...] = field(default=())
    full_depth_fallback: bool = False  # RAEE found no neighbour with an exit record and ran every layer


def parse_policy(policy: str, num_layers: int) -> int | None:
    """None for RAEE, else the fixed exit layer of `full` or `static:L`."""
    if policy == "raee":
        return None
    if policy == "full":
        return num_layers
    name, _, layer = policy.partition(":")
    if name == "static" and layer.isdigit() and int(layer) <= num_layers:
        return int(layer)
    raise InputError(f"policy {policy!r} is not one of raee, full, static:L with L in 0..{num_layers}")


def load_backbone_for(manifest: StoreManifest, *, source: str | None = None, device: str = "cpu",
                      runtime: str = "auto", precision: str | None = None,
                      allow_precision_mismatch: bool = False) -> Backbone:
    """The backbone a store was built with (source, kind, dtype, settings), on the runtime asked for, at the store's
    precision unless another is asked for."""
    built = manifest.backbone
    wanted = precision or built.precision
    if precision is None and runtime == "torch" and wanted == "int8" and allow_precision_mismatch:
        wanted = None  # int8 records served by torch's own precision, as asked
    return load_backbone(source or built.source, kind=built.kind, device=device, dtype=built.dtype,
                         runtime=runtime, precision=wanted, **built.settings)


class Engine:
    """A backbone with one task's exit store. `classify` is safe to call from one thread at a time."""

    def __init__(self, store: ExitStore, backbone: Backbone, embedder: Embedder | None = None,
                 allow_precision_mismatch: bool = False) -> None:
        check_compatible(store.manifest, backbone, embedder if store.key.source == "embedder" else None,
                         allow_precision_mismatch)
        key_dim = embedder.identity()["dim"] if store.key.source == "embedder" else backbone.hidden_size
        if key_dim != store.index.d:
            raise StoreMismatchError(f"store keys are {store.index.d}-d, this key source gives {key_dim}-d")
        if store.key.source == "prefix" and store.key.layer > backbone.max_prefix_layer:
            raise StoreMismatchError(f"store key {store.key} pools layer {store.key.layer}; this backbone's prefix "
                                     f"keys stop at layer {backbone.max_prefix_layer}")
        self.store, self.backbone, self.embedder = store, backbone, embedder
        self.task = store.task
        self.policy = store.policy
        self.index = on_best_device(store.index)
        self._record_probability = store.records.record_probability()
        self.prompting = self.task.prompting(backbone.kind, backbone.mask_token)
        self.head = backbone.head(self.prompting.head)  # label ids / verbalization states now, not on a request

    @classmethod
    def load(cls, store_dir: str | Path, *, backbone: Backbone | None = None, embedder: Embedder | None = None,
             device: str = "cpu", source: str | None = None, runtime: str = "auto", precision: str | None = None,
             allow_precision_mismatch: bool = False) -> "Engine":
        """Load a store and the backbone (and embedder) it was built with, from the sources its manifest names.

        source: the backbone checkpoint, when it has moved since the build (its weights must still match).
        runtime, precision: see raee.backbones.load_backbone; precision defaults to the store's own.
        """
        store = load_store(store_dir)
        if backbone is None:
            backbone = load_backbone_for(store.manifest, source=source, device=device, runtime=runtime,
                                         precision=precision, allow_precision_mismatch=allow_precision_mismatch)
        if embedder is None and store.manifest.embedder is not None:
            embedder = Embedder(store.manifest.embedder.source, device=device)
        return cls(store, backbone, embedder, allow_precision_mismatch)

    @property
    def num_layers(self) -> int:
        return self.backbone.num_layers

    def check_texts(self, texts: list[str]) -> None:
        """Raise InputError for texts this engine would refuse in a batch (empty, too long with the prompt, a
        masked-LM prompt without exactly one mask), naming the text: lets a server refuse a request before it
        joins other requests' batch."""
        self.backbone.check_texts(texts)
        self.backbone.check_prompts(self.prompting.prompts(texts))

    def classify(self, texts: list[str], *, policy: str = "raee", k: int | None = None,
                 with_neighbours: bool = False, raee: RaeeConfig | None = None) -> list[Classification]:
        """Classify a batch; each text leaves the backbone at its own exit layer.

        policy: raee, full or static:L. k overrides the store's neighbour count; raee replaces its whole RAEE
        configuration (both only matter for policy raee)."""
        fixed_exit = parse_policy(policy, self.num_layers)
        config = raee or self.policy
        config = config if k is None else dataclasses.replace(config, k=k)
        self.backbone.check_texts(texts)
        key_layer = self.store.key.layer if self.store.key.source == "prefix" else None
        sims = ids = None
        fallback = np.zeros(len(texts), dtype=bool)
        t0 = time.perf_counter()
        if fixed_exit is not None:
            exits = np.full(len(texts), fixed_exit)
            logits = self._run_to_exits(self.backbone.start(self.prompting.prompts(texts)), [], exits)
            t1 = t2 = t0
        else:
            if key_layer is None:
                keys = self.embedder.encode(texts)
                fwd, early = self.backbone.start(self.prompting.prompts(texts)), []
            else:
                fwd, early = self._prefix_pass(texts, key_layer)
                keys = mean_pool(fwd.hidden, fwd.attention_mask).cpu().numpy()
            t1 = time.perf_counter()
            sims, ids = search(self.index, keys, config.k)
            scores = layer_scores(sims, ids, self._record_probability, config)
            exits = exit_layers_from_scores(scores, config.earliest_ratio)
            fallback = scores.max(axis=1) <= 0
            t2 = time.perf_counter()
            logits = self._run_to_exits(fwd, early, exits)
        times = StageTimes((t1 - t0) * 1e3, (t2 - t1) * 1e3, (time.perf_counter() - t2) * 1e3)
        probs = softmax(logits)
        return [Classification(
            label=self.task.labels[int(probs[i].argmax())], label_index=int(probs[i].argmax()),
            scores=tuple(float(p) for p in probs[i]), exit_layer=int(exits[i]),
            layers_run=int(max(exits[i], key_layer or 0)) if fixed_exit is None else int(exits[i]),
            num_layers=self.num_layers, times=times,
            neighbours=tuple(Neighbour(int(j), float(s)) for j, s in zip(ids[i], sims[i]) if j >= 0)
            if with_neighbours and ids is not None else (), full_depth_fallback=bool(fallback[i]))
            for i in range(len(texts))]

    def _prefix_pass(self, texts: list[str], key_layer: int):
        """Run layers 1..K for the whole batch, keeping the head's logits at layers 0..K for rows that exit there."""
        fwd = self.backbone.start(self.prompting.prompts(texts))
        everyone = torch.ones(len(texts), dtype=torch.bool, device=self.backbone.device)
        early = [self.backbone.label_logits(fwd, everyone, self.head)]
        while fwd.layer < key_layer:
            fwd.advance()
            early.append(self.backbone.label_logits(fwd, everyone, self.head))
        return fwd, early

    def _run_to_exits(self, fwd, early: list[torch.Tensor], exits: np.ndarray) -> np.ndarray:
        """(B, C) label logits at each row's exit layer."""
        logits = np.zeros((len(exits), self.task.num_labels), dtype=np.float32)
        done = exits <= fwd.layer if early else np.zeros(len(exits), dtype=bool)
        for row in np.flatnonzero(done):
            logits[row] = early[exits[row]][row].float().cpu().numpy()
        if not done.all():
            keep = torch.from_numpy(~done).to(fwd.hidden.device)
            fwd.keep_rows(keep)
            out = self.backbone.finish(fwd, torch.from_numpy(exits[~done]), self.head)
            logits[~done] = out[torch.from_numpy(~done)].cpu().numpy()
        return logits
