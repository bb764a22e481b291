"""Choosing RAEE's hyper-parameters on calibration data only.

The train file is split (seeded) into a store part and a held-out part. One backbone pass over all of it gives
every layer's logits and every candidate key; each configuration is then scored on the held-out part by pure
array work: retrieve from the store part, pick exit layers, read the held-out items' own logits at those layers.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from raee.calibration import best_within_budget
from raee.errors import InputError
from raee.guarantee import certified_within_budget
from raee.index import IndexSpec, build_index, search
from raee.metrics import task_score
from raee.raee_rule import RaeeConfig, exit_layers_from_scores, layer_scores
from raee.records import ExitRecords, layers_run, predictions_at

HOLDOUT = 0.2  # share of the calibration items held out to score each setting on


@dataclass(frozen=True)
class TrialResult:
    key: str
    scale: float | None  # sentence-encoder cosine scale (None: the backbone has no such setting)
    k: int
    tau: float
    earliest_ratio: float
    score: float  # held-out score at RAEE's exits
    avg_exit_layer: float
    avg_layers_run: float  # with a prefix key, max(exit, K)
    full_score: float  # held-out score at full depth, same scale
    within_budget: bool | None = None  # certified to run at most the depth budget (grid_search's depth_budget)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def split_indices(n: int, holdout: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(store rows, held-out rows), a seeded random split."""
    order = np.random.default_rng(seed).permutation(n)
    cut = int(round(n * (1 - holdout)))
    return np.sort(order[:cut]), np.sort(order[cut:])


def grid_search(records: ExitRecords, keys: dict[str, np.ndarray], metric: str, *, holdout: float = HOLDOUT,
                scales: Sequence[float | None] = (None,), base_scale: float | None = None, ks: Sequence[int] = (12,),
                taus: Sequence[float] = (0.9,), ratios: Sequence[float] = (1.0,), seed: int = 0,
                depth_budget: float | None = None, delta: float = 0.1,
                index_spec: IndexSpec = IndexSpec()) -> list[TrialResult]:
    """Score every (key, scale, k, tau, earliest ratio) on the held-out split.

    keys: key name ("prefix:1", "embedder") -> (N, D); the store part is searched with index_spec (default: the
    build's default index, so a trial sees the neighbours a store built the same way would serve). With
    depth_budget, each trial says whether it is certified to run at most that share of the layers on average, as
    build's `best` certifies (raee.guarantee): each (key, scale, k, tau) is a path over the earliest ratios, tested
    from the lowest ratio up at level delta / (paths)."""
    store_rows, held_rows = split_indices(records.num_items, holdout, seed)
    gold = records.gold[held_rows]
    if not all(0 < r <= 1 for r in ratios):
        raise InputError(f"earliest ratios must lie in (0, 1], got {list(ratios)}")
    results: list[TrialResult] = []
    paths = len(keys) * len(scales) * len(ks) * len(taus)
    for key_name, key_matrix in keys.items():
        index = build_index(key_matrix[store_rows], index_spec)
        sims, ids = search(index, key_matrix[held_rows], max(ks))
        key_layer = int(key_name.split(":")[1]) if key_name.startswith("prefix:") else 0
        for scale in scales:
            factor = 1.0 if scale is None or base_scale is None else scale / base_scale
            scaled = ExitRecords(records.gold, records.label_logits * factor)
            record_probability = scaled.record_probability()[store_rows]
            held_logits = scaled.label_logits[held_rows]  # (H, L+1, C)
            full = task_score(metric, held_logits[:, -1].argmax(axis=-1), gold)
            for k, tau in itertools.product(ks, taus):
                scores = layer_scores(sims[:, :k], ids[:, :k], record_probability, RaeeConfig(k=k, tau=tau))
                path = []
                for ratio in sorted(ratios):  # cheapest first
                    exits = exit_layers_from_scores(scores, ratio)
                    score = task_score(metric, predictions_at(held_logits, exits), gold)
                    run = layers_run(exits, key_layer)
                    path.append((TrialResult(key_name, scale, k, tau, ratio, score, float(exits.mean()),
                                             float(run.mean()), full), run / records.num_layers))
                if depth_budget is not None:
                    certified = certified_within_budget((share for _, share in path), depth_budget,
                                                        delta / paths)
                    path = [(dataclasses.replace(t, within_budget=i < certified), share)
                            for i, (t, share) in enumerate(path)]
                results.extend(t for t, _ in path)
    return results


def choose(results: list[TrialResult], num_layers: int) -> TrialResult:
    """The best held-out score among trials certified within the depth budget grid_search was given (the rule
    build-time calibration uses: raee.calibration.best_within_budget)."""
    if any(r.within_budget is None for r in results):
        raise InputError("choose needs trials certified against a depth budget: grid_search(depth_budget=...)")
    return results[best_within_budget([r.score for r in results], [r.avg_layers_run / num_layers for r in results],
                                      [bool(r.within_budget) for r in results])]
