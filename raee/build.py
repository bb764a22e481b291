"""Building exit stores: run the backbone over labelled calibration items, record every layer, key every item."""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import faiss
import numpy as np
from tqdm.auto import tqdm

from raee.backbones.base import Backbone
from raee.calibration import (
    SEARCH_WIDTH,
    CalibratedPolicy,
    CalibrationEvidence,
    CalibrationSettings,
    KeyTrial,
    calibrate,
    key_layers_for,
)
from raee.data import Example, text_groups
from raee.errors import InputError, StoreError
from raee.exit_policy import Objective
from raee.index import IndexSpec, build_index, keys_of, leave_one_out_search
from raee.keys import Embedder, KeySpec, require_embedder
from raee.manifest import BackboneIdentity, EmbedderIdentity, Shard, StoreManifest
from raee.raee_rule import RaeeConfig
from raee.records import ExitRecords
from raee.store import ExitStore, load_store, write_store
from raee.tasks import TaskDefinition
from raee.versions import check_store_root

log = logging.getLogger(__name__)
BATCH_SIZE = 64  # items per backbone batch in the calibration and scoring passes


@dataclass
class CalibrationPass:
    """Everything one pass over calibration items yields, in the items' order."""

    records: ExitRecords
    keys: np.ndarray  # (N, D) float32 unit rows
    texts: list[str]
    lines: np.ndarray  # (N,) source line of each item
    seconds: float
    pooled: dict[int, np.ndarray]  # layer -> (N, H) mean-pooled states asked for with `extra_pooled_layers`

    @property
    def items_per_second(self) -> float:
        return len(self.texts) / self.seconds if self.seconds > 0 else float("inf")


def shard_of(examples: list[Example], shard: tuple[int, int] | None) -> list[Example]:
    """Shard I of N: the I-th of N contiguous blocks, so merging shards in order restores the item order."""
    if shard is None:
        return examples
    i, n = shard
    if not (n >= 1 and 0 <= i < n):
        raise InputError(f"shard {i}/{n}: need 0 <= I < N")
    return examples[len(examples) * i // n: len(examples) * (i + 1) // n]


def readable_examples(backbone: Backbone, task: TaskDefinition, examples: list[Example],
                      what: str = "items") -> tuple[list[Example], list[int]]:
    """The examples the backbone can read whole, with their prompt lengths in tokens; the others are skipped and
    their lines logged. A text past the character guard counts as too long, as the engine refuses it unread."""
    prompting = task.prompting(backbone.kind, backbone.mask_token)
    guarded = [i for i, e in enumerate(examples) if not backbone.refuses_unread(e.text)]  # the rest: refused unread
    prompts = prompting.prompts([examples[i].text for i in guarded])
    tokens = dict(zip(guarded, backbone.token_counts(prompts) if guarded else []))
    kept = [i for i in guarded if backbone.reads_whole(tokens[i])]
    readable = set(kept)
    too_long = [e.line for i, e in enumerate(examples) if i not in readable]
    if too_long:
        log.warning("skipping %d %s longer than %d tokens (lines %s%s)", len(too_long), what, backbone.max_tokens,
                    ", ".join(map(str, too_long[:10])), " ..." if len(too_long) > 10 else "")
    return [examples[i] for i in kept], [tokens[i] for i in kept]


def run_calibration_pass(backbone: Backbone, task: TaskDefinition, examples: list[Example], key: KeySpec,
                         embedder: Embedder | None = None, batch_size: int = BATCH_SIZE, progress: bool = True,
                         extra_pooled_layers: tuple[int, ...] = ()) -> CalibrationPass:
    """Run the backbone once over every item (label logits at all layers) and compute each item's key.

    Items too long for the backbone are skipped with a warning naming their lines.
    """
    if key.source == "embedder" and embedder is None:
        raise InputError("embedder keys need an embedder")
    if key.prefix_layers > backbone.max_prefix_layer:
        raise InputError(f"prefix key layer {key.layer} is past layer {backbone.max_prefix_layer}, the deepest "
                         f"this {backbone.kind} backbone's keys can pool")
    prompting = task.prompting(backbone.kind, backbone.mask_token)
    head = backbone.head(prompting.head)
    examples, counts = readable_examples(backbone, task, examples, "calibration items")
    if not examples:
        raise InputError("no calibration items left to index")
    order = np.argsort(counts, kind="stable")  # similar lengths batch together: less padding
    logits = np.zeros((len(examples), backbone.num_layers + 1, task.num_labels), dtype=np.float32)
    vocab: np.ndarray | None = None  # (N, L+1, 2) when the backbone reports the full vocabulary's top two
    keys: np.ndarray | None = None
    pooled_layers = tuple(sorted({*extra_pooled_layers, *((key.layer,) if key.layer is not None else ())}))
    pooled = {layer: np.zeros((len(examples), backbone.hidden_size), np.float32) for layer in pooled_layers}
    started = time.perf_counter()
    with tqdm(total=len(examples), desc=f"indexing {task.name}", unit="item", disable=not progress) as bar:
        for start in range(0, len(examples), batch_size):
            rows = order[start:start + batch_size]
            texts = [examples[i].text for i in rows]
            layer_pass = backbone.all_layers(prompting.prompts(texts), head, pooled_layers=pooled_layers,
                                             with_vocab_top2=True)
            for layer in pooled_layers:
                pooled[layer][rows] = layer_pass.pooled[layer]
            batch_keys = (layer_pass.pooled[key.layer] if key.layer is not None else
                          require_embedder(embedder).encode(texts))
            if keys is None:
                keys = np.zeros((len(examples), batch_keys.shape[1]), dtype=np.float32)
            logits[rows], keys[rows] = layer_pass.label_logits, batch_keys
            batch_vocab = layer_pass.vocab_top2  # LM backbones only
            if batch_vocab is not None:
                if vocab is None:
                    vocab = np.zeros((len(examples), backbone.num_layers + 1, 2), dtype=np.float32)
                vocab[rows] = batch_vocab
            bar.update(len(rows))
    seconds = time.perf_counter() - started
    gold = np.array([e.label for e in examples], dtype=np.int64)
    assert keys is not None  # at least one batch ran (no items was refused above)
    return CalibrationPass(ExitRecords(gold, logits, vocab), keys, [e.text for e in examples],
                           np.array([e.line for e in examples], dtype=np.int64), seconds,
                           {layer: pooled[layer] for layer in extra_pooled_layers})


def store_manifest(task: TaskDefinition, backbone: Backbone, embedder: Embedder | None, key: KeySpec,
                   index_spec: IndexSpec, policy: RaeeConfig, calibration: CalibrationPass, *,
                   settings: CalibrationSettings, source_file: str | None = None,
                   shard: tuple[int, int] | None = None) -> StoreManifest:
    """The draft manifest of a store built from `calibration` (write_store adds the version and file entries)."""
    return StoreManifest(
        task=task, backbone=BackboneIdentity.from_dict(backbone.identity()),
        embedder=(EmbedderIdentity.from_dict(require_embedder(embedder).identity()) if key.source == "embedder"
                  else None),
        key=key, key_dim=int(calibration.keys.shape[1]), num_layers=backbone.num_layers,
        num_items=calibration.records.num_items, num_labels=task.num_labels, index=index_spec, policy=policy,
        calibration_settings=settings, shard=Shard(*shard) if shard else None, source_file=source_file,
        build={"seconds": round(calibration.seconds, 3), "items_per_second": round(calibration.items_per_second, 1)})


def build_store(out: str | Path, task: TaskDefinition, backbone: Backbone, examples: list[Example], *,
                key: KeySpec | tuple[KeySpec, ...], embedder: Embedder | None = None,
                index_spec: IndexSpec = IndexSpec(),
                policy: RaeeConfig = RaeeConfig(), settings: CalibrationSettings = CalibrationSettings(),
                batch_size: int = BATCH_SIZE, shard: tuple[int, int] | None = None, source_file: str | None = None,
                progress: bool = True, promote: bool = True) -> tuple[Path, CalibrationPass]:
    """Run the backbone over the items, index them, calibrate the served policy (not for a shard: merging does)
    and write a store version; returns (version directory, the calibration pass). The output directory is checked
    first, so a wrong --out fails in a second, not after an hour. key: one key, or prefix keys to choose between
    (raee.keys.parse_key_choice: `auto`), each calibrated in turn (choose_key)."""
    check_store_root(out)
    candidates = (key,) if isinstance(key, KeySpec) else tuple(sorted(key, key=lambda k: k.prefix_layers))
    check_key_choice(candidates, shard)  # the deepest, last, is the one the pass checks against the backbone
    settings = dataclasses.replace(settings, key_layers=key_layers_for(candidates[0].source))  # saved in the store
    started = time.perf_counter()
    calibration = run_calibration_pass(backbone, task, shard_of(examples, shard), candidates[-1], embedder,
                                       batch_size, progress, extra_pooled_layers=tuple(
                                           k.prefix_layers for k in candidates) if len(candidates) > 1 else ())
    calibrated: tuple[CalibratedPolicy, CalibrationEvidence] | None = None
    if len(candidates) > 1:
        chosen_key, index, calibrated = choose_key(calibration, candidates, task.metric, policy, settings,
                                                   index_spec)
        calibration = dataclasses.replace(calibration, keys=calibration.pooled[chosen_key.prefix_layers])
    else:
        chosen_key, index = candidates[0], build_index(calibration.keys, index_spec)
    manifest = store_manifest(task, backbone, embedder, chosen_key, index_spec, policy, calibration,
                              settings=settings, source_file=source_file, shard=shard)
    if shard is None:
        chosen, evidence = calibrated or calibrate_items(calibration.records, index, calibration.texts,
                                                         chosen_key, task.metric, policy, settings)
        manifest = dataclasses.replace(manifest, calibrated_policy=chosen, calibration_evidence=evidence,
                                       requires=_requires(manifest.requires))
        log.info("calibrated %s: %s", settings.objective, chosen.name)
    seconds = time.perf_counter() - started
    manifest = dataclasses.replace(manifest, build={
        **manifest.build, "seconds_total": round(seconds, 3),
        "items_per_second_total": round(calibration.records.num_items / seconds, 1)})
    version = write_store(out, manifest, calibration.records, index, calibration.texts, calibration.lines,
                          promote=promote)
    return version, calibration


def calibrate_items(records: ExitRecords, index: faiss.Index, texts: list[str], key: KeySpec, metric: str,
                    raee: RaeeConfig, settings: CalibrationSettings) -> tuple[CalibratedPolicy, CalibrationEvidence]:
    """Leave-one-out neighbours of every item (items of the same text left out too), then calibration."""
    if settings.key_layers == "votes" and key.source != "prefix":
        raise InputError(f"key_layers=votes reads the layers a prefix key ran; this key is {key}")
    similarities, ids = leave_one_out_search(index, text_groups(texts), SEARCH_WIDTH)
    return calibrate(records, similarities, ids, key_layer=key.prefix_layers, metric=metric, raee=raee,
                     settings=settings)


def check_key_choice(keys: tuple[KeySpec, ...], shard: tuple[int, int] | None) -> None:
    """Refuse a choice of keys a build cannot make: only between prefix keys, and not for a shard."""
    if len(keys) > 1 and shard is not None:
        raise InputError("a shard is calibrated only when merged, so it cannot choose its key: build every shard "
                         "with one key (prefix:K)")
    if len(keys) > 1 and any(k.source != "prefix" for k in keys):
        raise InputError("a build chooses only between prefix keys")


def choose_key(calibration: CalibrationPass, keys: tuple[KeySpec, ...], metric: str, raee: RaeeConfig,
               settings: CalibrationSettings, index_spec: IndexSpec,
               ) -> tuple[KeySpec, faiss.Index, tuple[CalibratedPolicy, CalibrationEvidence]]:
    """Calibrate the objective with each prefix key in turn and keep the best: for match-full the fewest layers
    run, for best and raee the highest calibration score, a key whose setting is certified within best's budget
    before any that is not (ties: fewer layers, then the shallower key). Each key is calibrated at delta / (number
    of keys), so the chosen key's guarantee keeps level delta (a union bound over the keys); the evidence lists
    every key, and a later calibration of the store uses the same level (calibration_settings). Returns (the key,
    its index, its policy and evidence)."""
    share = dataclasses.replace(settings, delta=settings.delta / len(keys))
    trials = []
    for key in keys:
        index = build_index(calibration.pooled[key.prefix_layers], index_spec)
        chosen, evidence = calibrate_items(calibration.records, index, calibration.texts, key, metric,
                                           raee, share)
        point = evidence.curve[evidence.chosen] if evidence.chosen >= 0 else None
        trial = KeyTrial(str(key), chosen.name, point.score if point else evidence.full_score,
                         point.layers_run if point else 1.0, share.delta,
                         settings.objective != "best" or bool(point and point.accepted))
        log.info("key %s: %s, calibration score %.4f at %.1f%% of the layers", key, chosen.name, trial.score,
                 100 * trial.layers_run)
        trials.append((key, index, chosen, evidence, trial))
    if settings.objective == "match-full":
        key, index, chosen, evidence, _ = min(trials, key=lambda t: (t[4].layers_run, -t[4].score,
                                                                     t[0].prefix_layers))
    else:
        key, index, chosen, evidence, _ = min(trials, key=lambda t: (not t[4].certified, -round(t[4].score, 9),
                                                                     t[4].layers_run, t[0].prefix_layers))
    log.info("chose key %s", key)
    return key, index, (dataclasses.replace(chosen, settings=settings),
                        dataclasses.replace(evidence, keys=tuple(t[4] for t in trials)))


def calibration_settings(manifest: StoreManifest) -> CalibrationSettings:
    """The settings a store's items are calibrated at again (another objective, a --like build): the build's, with
    delta over the number of keys it chose between, as its own calibration was tested at."""
    settings = manifest.calibration_settings or CalibrationSettings()
    tried = manifest.calibration_evidence.keys_tried if manifest.calibration_evidence is not None else 1
    return dataclasses.replace(settings, delta=settings.delta / tried)


def calibrate_store(store: ExitStore, objective: Objective | None = None) -> CalibratedPolicy:
    """The store's calibrated policy, or the one `objective` would have chosen at build time (same items, same
    settings otherwise, delta as calibration_settings says): how raee-eval scores several objectives from one
    store."""
    if objective is None:
        return store.calibrated_policy
    settings = dataclasses.replace(calibration_settings(store.manifest), objective=objective)
    chosen, _ = calibrate_items(store.records, store.index, store.texts, store.key, store.task.metric,
                                store.policy, settings)
    return chosen


def _requires(sections: tuple[str, ...]) -> tuple[str, ...]:
    """`sections` plus the calibrated policy, which a reader must understand: ignoring it would serve another policy."""
    return tuple(dict.fromkeys((*sections, "calibrated_policy")))


# Manifest fields every shard of one build shares.
SHARED_FIELDS = ("task", "backbone", "embedder", "key", "key_dim", "num_layers", "num_labels", "index", "policy",
                 "calibration_settings", "source_file", "extra")


def merge_stores(out: str | Path, parts: list[str | Path], promote: bool = True) -> Path:
    """Join shard stores (any order) into one store that answers exactly as an unsharded build. promote=False:
    CURRENT stays (raee.store.write_store)."""
    check_store_root(out)
    stores: list[ExitStore] = [load_store(p) for p in parts]
    if any(s.manifest.shard is None for s in stores):
        raise StoreError("every part must be a shard (built with --shard I/N)")
    shards = [s.manifest.shard for s in stores if s.manifest.shard is not None]
    count = shards[0].count
    stores.sort(key=lambda s: s.manifest.shard.index if s.manifest.shard is not None else -1)
    found = sorted(shard.index for shard in shards)
    if found != list(range(count)) or any(shard.count != count for shard in shards):
        raise StoreError(f"merge needs shards 0..{count - 1} of one build exactly once, got {found}")
    first = stores[0].manifest
    for s in stores[1:]:
        differ = [f for f in SHARED_FIELDS if getattr(s.manifest, f) != getattr(first, f)]
        if differ:
            raise StoreError(f"shard {s.path} differs from {stores[0].path} in {', '.join(differ)}")
    records = ExitRecords.concatenate([s.records for s in stores])
    keys = np.concatenate([keys_of(s.index) for s in stores])
    index = build_index(keys, stores[0].index_spec)
    texts = [t for s in stores for t in s.texts]
    chosen, evidence = calibrate_items(records, index, texts, stores[0].key, first.task.metric, first.policy,
                                       first.calibration_settings or CalibrationSettings())
    manifest = dataclasses.replace(
        first, num_items=records.num_items, shard=None, merged_from=tuple(s.version for s in stores),
        calibrated_policy=chosen, calibration_evidence=evidence, requires=_requires(first.requires),
        build={"seconds": round(sum(s.manifest.build.get("seconds", 0.0) for s in stores), 3)},
        version="", created_at="", files={})
    lines = np.concatenate([s.lines for s in stores])
    return write_store(out, manifest, records, index, texts, lines, promote=promote)
