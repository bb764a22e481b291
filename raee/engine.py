"""Serving-time classification: key, retrieve, choose an exit layer, run the backbone only that far."""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from raee.backbones.base import Backbone, Tokens
from raee.backbones.layerwise import LayerwiseForward
from raee.backbones.loading import load_backbone
from raee.calibration import CalibratedPolicy
from raee.errors import InputError, StoreMismatchError
from raee.exit_policy import CALIBRATED, ENGINE_KINDS, ExitPolicy, Objective
from raee.exits import Decision, RecordArrays, Resolved, decide, resolve
from raee.index import on_best_device, search
from raee.keys import Embedder, require_embedder
from raee.manifest import StoreManifest
from raee.offdomain import StreamMonitor, conformal_pvalues
from raee.records import layers_run, softmax
from raee.runtime import Precision, RuntimeChoice
from raee.store import ExitStore, check_compatible, load_store
from raee.truncation import fit_texts

log = logging.getLogger(__name__)
RESOLVED_POLICIES = 64  # policies an engine remembers resolving (Engine._resolve)


@dataclass(frozen=True)
class StageTimes:
    """Wall time of each stage for the batch a text was classified in, in milliseconds. With a prefix key, `key`
    includes the backbone's first K layers, which the backbone stage then does not repeat; with an embedder key it
    is the embedder alone, and the backbone stage starts from the embeddings."""

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
    full_depth_fallback: bool = False  # the rule found no neighbour with an exit record and ran every layer
    off_domain: str = ""  # the off-domain gate sent the text to full depth: far, disagree or shifted ("" = no)
    truncated: bool = False  # the text was cut to the backbone's token limit (classify's truncate)


@dataclass(frozen=True)
class _Group:
    """Rows of a batch that run through the backbone together (length_groups): their indexes in the batch, their
    forward state, and their states at layers 0..K when a prefix key ran them (read for rows that exit there)."""

    rows: np.ndarray
    fwd: LayerwiseForward
    early: list[LayerwiseForward]
    early_logits: np.ndarray | None = None  # (rows, K+1, C) label logits at layers 0..K, when the decision read them


@dataclass(frozen=True)
class _Route:
    """How a batch reaches its exits: exit layers (B,), the backbone's groups of rows, when keying and search
    ended, and for a retrieval policy the decision and neighbours (B, width) behind the exits."""

    exits: np.ndarray
    groups: list[_Group]
    keyed: float
    searched: float
    decision: Decision | None = None
    sims: np.ndarray | None = None
    ids: np.ndarray | None = None
    tokenizing: float = 0.0  # seconds of tokenizing before the key that belong to the backbone (embedder keys)


def load_backbone_for(manifest: StoreManifest, *, source: str | None = None, device: str = "cpu",
                      runtime: RuntimeChoice = "auto", precision: Precision | None = None,
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
    """A backbone with one task's exit store. `classify` is safe to call from one thread at a time (the off-domain
    gate's stream test keeps state across calls)."""

    def __init__(self, store: ExitStore, backbone: Backbone, embedder: Embedder | None = None,
                 allow_precision_mismatch: bool = False) -> None:
        check_compatible(store.manifest, backbone, embedder if store.key.source == "embedder" else None,
                         allow_precision_mismatch)
        key_dim = (require_embedder(embedder).identity()["dim"] if store.key.source == "embedder" else
                   backbone.hidden_size)
        if key_dim != store.index.d:
            raise StoreMismatchError(f"store keys are {store.index.d}-d, this key source gives {key_dim}-d")
        if store.key.prefix_layers > backbone.max_prefix_layer:
            raise StoreMismatchError(f"store key {store.key} pools layer {store.key.layer}; this backbone's prefix "
                                     f"keys stop at layer {backbone.max_prefix_layer}")
        self.store, self.backbone, self.embedder = store, backbone, embedder
        self.task = store.task
        self.index = on_best_device(store.index)
        self.arrays = RecordArrays(store.records)
        self._calibrated: dict[Objective | None, CalibratedPolicy] = {None: store.calibrated_policy}
        self._monitors: dict[Objective | None, StreamMonitor] = {}
        self._resolved: dict[ExitPolicy | str, tuple[ExitPolicy, Resolved]] = {}
        self.prompting = self.task.prompting(backbone.kind, backbone.mask_token)
        self.head = backbone.head(self.prompting.head)  # label ids / verbalization states now, not on a request
        # the fewest tokens any text costs: its prompt's alone (a text of zero-width characters adds none)
        self.least_tokens = backbone.token_counts(self.prompting.prompts([""]))[0]
        if store.key.source == "prefix":
            backbone.prepare_prefix(store.key_layer)
        log.info("%s store %s serves %s by default", self.task.name, store.version, self.calibrated().name)

    @classmethod
    def load(cls, store_dir: str | Path, *, backbone: Backbone | None = None, embedder: Embedder | None = None,
             device: str = "cpu", source: str | None = None, runtime: RuntimeChoice = "auto",
             precision: Precision | None = None,
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

    def check_texts(self, texts: list[str]) -> list[int]:
        """Raise InputError for texts this engine would refuse in a batch (empty, too long with the prompt, a
        masked-LM prompt without exactly one mask), naming the text: lets a server refuse a request before it
        joins other requests' batch. Returns each text's tokens with its prompt."""
        self.backbone.check_texts(texts)
        return [len(ids) for ids in self.backbone.check_prompts(self.prompting.prompts(texts))]

    def check_prefix(self, index: int, text: str) -> None:
        """Refuse a long text as soon as a prefix of it is too many tokens with its prompt, without tokenizing the
        rest (an 8 KB text costs milliseconds to tokenize whole); see Backbone.prefix_to_check. index: the text's
        place in the request, for the message."""
        prefix = self.backbone.prefix_to_check(text)
        if prefix is None:
            return
        tokens = self.backbone.token_counts(self.prompting.prompts([prefix]))[0]
        if not self.backbone.reads_whole(tokens):
            raise InputError(f"text {index} is over {tokens} tokens with its prompt (its first {len(prefix)} "
                             f"characters already are); the limit is {self.backbone.max_tokens}")

    def fit(self, texts: list[str]) -> tuple[list[str], list[bool]]:
        """Each text cut to what the backbone reads with this task's prompt (raee.truncation; a text that fits is
        left alone), and whether it was cut."""
        return fit_texts(self.backbone, self.prompting, texts)

    def calibrated(self, objective: Objective | None = None) -> CalibratedPolicy:
        """The store's calibrated policy, or the one `objective` calibrates on the store's items (computed once)."""
        if objective not in self._calibrated:
            from raee.build import calibrate_store  # the leave-one-out search lives with the build
            self._calibrated[objective] = calibrate_store(self.store, objective)
        return self._calibrated[objective]

    def resolve(self, policy: ExitPolicy | str) -> Resolved:
        """The rule, gate or fixed exit `policy` means for this store."""
        return self._resolve(policy)[1]

    def _resolve(self, policy: ExitPolicy | str) -> tuple[ExitPolicy, Resolved]:
        """(the parsed policy, what it means here), remembered for the policies last asked for: parsing and
        resolving cost about 50 us a call, a fifth of a batch-1 head read."""
        rememberable = isinstance(policy, (str, ExitPolicy))  # anything else is refused by parse, as before
        known = self._resolved.get(policy) if rememberable else None
        if known is not None:
            return known
        parsed = ExitPolicy.parse(policy)
        if parsed.kind not in ENGINE_KINDS:
            raise InputError(f"policy {parsed} cannot be served; the engine serves "
                             "calibrated, raee, accuracy, full and static:L")
        calibrated = self.calibrated(parsed.objective) if parsed.kind == "calibrated" else self._calibrated[None]
        known = parsed, resolve(parsed, calibrated, self.store.policy, self.num_layers)
        if known[1].reads_predictions and self.store.key.source != "prefix":
            raise InputError(f"policy {parsed}: key_layers=votes reads the predictions at the layers a prefix key "
                             f"ran, and this store's key is {self.store.key}")
        if len(self._resolved) >= RESOLVED_POLICIES:  # clients choose policies: keep the memory bounded
            self._resolved.clear()
        self._resolved[policy] = known
        return known

    def classify(self, texts: list[str], *, policy: ExitPolicy | str = CALIBRATED, with_neighbours: bool = False,
                 truncate: bool = False) -> list[Classification]:
        """Classify a batch; each text leaves the backbone at its own exit layer.

        policy: an ExitPolicy or its text (raee.exit_policy): by default the store's calibrated policy.
        truncate: a text longer than the backbone reads is cut to fit (`fit`) instead of refused with InputError;
        its result says so (`truncated`)."""
        policy, resolved = self._resolve(policy)
        self.backbone.check_texts(texts, truncate=truncate)
        cut = [False] * len(texts)
        if truncate:
            texts, cut = self.fit(texts)
        started = time.perf_counter()
        tokens = self.backbone.tokens(self.prompting.prompts(texts))  # once, whatever the groups, before any work
        rows = self.backbone.length_groups(tokens)
        if resolved.fixed_layer is not None:
            route = self._fixed_route(tokens, rows, resolved.fixed_layer, started)
        else:
            route = self._retrieval_route(texts, tokens, rows, resolved, policy.objective, started)
        logits = np.zeros((len(texts), self.task.num_labels), dtype=np.float32)
        for group in route.groups:
            logits[group.rows] = self._run_to_exits(group, route.exits[group.rows])
        times = StageTimes((route.keyed - started - route.tokenizing) * 1e3, (route.searched - route.keyed) * 1e3,
                           (time.perf_counter() - route.searched + route.tokenizing) * 1e3)
        shown = resolved.rule.k if with_neighbours and resolved.rule is not None else 0  # the rule's, not the gate's
        return [self._classification(i, probs, route, times, shown, cut[i]) for i, probs in enumerate(softmax(logits))]

    def _fixed_route(self, tokens: Tokens, rows: list[np.ndarray], layer: int, started: float) -> _Route:
        """Every text to one layer: no key, no search."""
        return _Route(np.full(len(tokens), layer), self._started(tokens, rows), keyed=started, searched=started)

    def _retrieval_route(self, texts: list[str], tokens: Tokens, rows: list[np.ndarray], resolved: Resolved,
                         objective: Objective | None, started: float) -> _Route:
        """Key the texts, retrieve their neighbours, decide each text's exit layer from their records. The search,
        the decision and the stream test see the whole batch in its own order, whatever the groups. started: when
        the batch's tokenizing began (it is the backbone's work, and a prefix key's)."""
        groups: list[_Group] = []
        tokenizing = 0.0
        if self.store.key.source == "embedder":
            tokenizing = time.perf_counter() - started
            keys = require_embedder(self.embedder).encode(texts)
        else:
            keys, groups = self._prefix_keys(tokens, rows)
        predicted = None
        if resolved.reads_predictions:  # the head at the key's layers: the key stage's backbone work
            groups = [self._read_key_layers(g) for g in groups]
            predicted = np.empty((len(texts), self.store.key_layer + 1), dtype=np.int64)
            for g in groups:
                assert g.early_logits is not None
                predicted[g.rows] = g.early_logits.argmax(axis=2)
        keyed = time.perf_counter()
        sims, ids = search(self.index, keys, resolved.search_width)
        decision = decide(resolved, sims, ids, self.arrays, self.store.key_layer,
                          self._alarms(objective, resolved, sims, ids), predicted)
        searched = time.perf_counter()
        if not groups:  # an embedder key: the backbone starts now, in its own stage
            groups = self._started(tokens, rows)
        return _Route(decision.exits, groups, keyed, searched, decision, sims, ids, tokenizing)

    def _started(self, tokens: Tokens, rows: list[np.ndarray]) -> list[_Group]:
        """Each group embedded (layer 0), nothing of the layer stack run yet."""
        return [_Group(r, self.backbone.start(tokens.rows(r)), []) for r in rows]

    def _prefix_keys(self, tokens: Tokens, rows: list[np.ndarray]) -> tuple[np.ndarray, list[_Group]]:
        """(keys (B, D) in the batch's order, each group's forward state at layer K and states at layers 0..K)."""
        keys: np.ndarray | None = None
        groups: list[_Group] = []
        for r in rows:
            fwd, early, group_keys = self.backbone.prefix_pass(tokens.rows(r), self.store.key_layer)
            found = group_keys.cpu().numpy()
            if keys is None:
                keys = np.empty((len(tokens), found.shape[1]), dtype=found.dtype)
            keys[r] = found
            groups.append(_Group(r, fwd, early))
        assert keys is not None  # a batch has at least one group
        return keys, groups

    def _read_key_layers(self, group: _Group) -> _Group:
        """The group with its label logits at layers 0..K read (each row's exit reuses them if it leaves there)."""
        every = torch.ones(len(group.rows), dtype=torch.bool, device=group.fwd.hidden.device)
        logits = [self.backbone.label_logits(state, every, self.head).float().cpu().numpy() for state in group.early]
        return dataclasses.replace(group, early_logits=np.stack(logits, axis=1))

    def _alarms(self, objective: Objective | None, resolved: Resolved, sims: np.ndarray,
                ids: np.ndarray) -> np.ndarray | None:
        """The stream test's verdicts for this batch, in order (None without a gate)."""
        if resolved.gate is None:
            return None
        monitor = self._monitors.setdefault(objective, StreamMonitor(resolved.gate))
        nearest = np.where(ids[:, 0] >= 0, sims[:, 0], -np.inf)
        return monitor.update(conformal_pvalues(resolved.gate, nearest))

    def _classification(self, i: int, probs: np.ndarray, route: _Route, times: StageTimes, shown: int,
                        truncated: bool) -> Classification:
        """Text i's result from its label probabilities (C,) at its exit, listing its first `shown` neighbours."""
        neighbours: tuple[Neighbour, ...] = ()
        if shown and route.ids is not None and route.sims is not None:
            neighbours = tuple(Neighbour(int(j), float(s))
                               for j, s in zip(route.ids[i, :shown], route.sims[i, :shown]) if j >= 0)
        decision = route.decision
        key_layer = self.store.key_layer if decision is not None else 0  # a fixed exit computes no key
        exit_layer = int(route.exits[i])
        return Classification(
            label=self.task.labels[int(probs.argmax())], label_index=int(probs.argmax()),
            scores=tuple(float(p) for p in probs), exit_layer=exit_layer,
            layers_run=int(layers_run(exit_layer, key_layer)), num_layers=self.num_layers, times=times,
            neighbours=neighbours, full_depth_fallback=bool(decision.no_evidence[i]) if decision is not None else False,
            off_domain=str(decision.off_domain[i]) if decision is not None else "", truncated=truncated)

    def _run_to_exits(self, group: _Group, exits: np.ndarray) -> np.ndarray:
        """(B, C) label logits at each row's exit layer."""
        fwd, early = group.fwd, group.early
        logits = np.zeros((len(exits), self.task.num_labels), dtype=np.float32)
        done = exits <= fwd.layer if early else np.zeros(len(exits), dtype=bool)
        for layer in np.unique(exits[done]):
            if group.early_logits is not None:  # read for the decision already
                logits[exits == layer] = group.early_logits[exits == layer, layer]
                continue
            here = torch.from_numpy(exits == layer).to(fwd.hidden.device)
            logits[exits == layer] = self.backbone.label_logits(early[layer], here, self.head).float().cpu().numpy()
        if not done.all():
            keep = torch.from_numpy(~done).to(fwd.hidden.device)
            if done.any():  # dropping no row would still copy every per-row tensor
                fwd.keep_rows(keep)
            out = self.backbone.finish(fwd, torch.from_numpy(exits[~done]), self.head)
            logits[~done] = out[torch.from_numpy(~done)].cpu().numpy()
        return logits
