"""Side-by-side evaluation of exit policies on a labelled test file.

Scores come from one pass over the test items that records every layer's head output (a truncated forward to
layer l gives exactly the full pass's layer-l output; the backbone tests prove it), so every policy is scored on the
same per-layer predictions. Speed comes from real truncated forwards on a sample, run as each policy runs online:
retrieval then a truncated pass for RAEE, the head read at every layer for AdaInfer and confidence, fixed exits for
full, static and the oracle.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch
from tqdm.auto import tqdm

from raee.build import readable_examples
from raee.data import Example
from raee.engine import Engine
from raee.exit_policies import PolicySpec, PolicySuite, QueryView, head_features
from raee.index import keys_of, search
from raee.metrics import task_score
from raee.store import ExitStore

MAX_NEIGHBOURS = 32  # the widest k any default policy asks for


@dataclass(frozen=True)
class PolicyResult:
    policy: str
    metric: str
    score: float
    avg_exit_layer: float
    avg_layers_run: float  # a prefix key runs at least K layers
    layers_saved: float  # 1 - avg_layers_run / L
    latency_ms_p50: float | None  # one text per call
    throughput_per_s: float | None  # texts per second in calls of 32

    def to_dict(self) -> dict:
        return asdict(self)


def default_policies(num_layers: int) -> list[str]:
    return (["full", *(f"static:{layer}" for layer in range(1, num_layers)), "oracle", "raee", "raee-no-tau",
             "raee-k:1", "raee-k:4", "raee-k:12", "raee-k:32",
             *(f"raee-earliest:{a / 10:g}" for a in range(3, 10)), "adainfer", "confidence"])


def test_view(engine: Engine, examples: list[Example], batch_size: int = 64, progress: bool = True) -> QueryView:
    """One pass over the test items: every layer's head output, the key, and MAX_NEIGHBOURS neighbours."""
    texts = [e.text for e in examples]
    key = engine.store.key
    logits, keys = [], []
    for start in tqdm(range(0, len(texts), batch_size), desc="test pass", unit="batch", disable=not progress):
        batch = texts[start:start + batch_size]
        layer_pass = engine.backbone.all_layers(engine.prompting.prompts(batch), engine.head,
                                                pooled_layers=(key.layer,) if key.layer is not None else ())
        logits.append(layer_pass.label_logits)
        keys.append(layer_pass.pooled[key.layer] if key.layer is not None else engine.embedder.encode(batch))
    sims, ids = search(engine.index, np.concatenate(keys), MAX_NEIGHBOURS)
    return QueryView(np.concatenate(logits), sims, ids, np.array([e.label for e in examples]))


def leave_one_out_view(store: ExitStore) -> QueryView:
    """The store's own items as queries, each without itself among its neighbours: calibration-only curves."""
    keys = keys_of(store.index)
    sims, ids = search(store.index, keys, MAX_NEIGHBOURS + 1)
    is_self = ids == np.arange(len(ids))[:, None]
    drop = np.where(is_self.any(axis=1), is_self.argmax(axis=1), ids.shape[1] - 1)  # else the farthest
    keep = np.ones_like(ids, dtype=bool)
    keep[np.arange(len(ids)), drop] = False
    return QueryView(store.records.label_logits, sims[keep].reshape(len(ids), -1), ids[keep].reshape(len(ids), -1),
                     store.records.gold)


def choose_earliest_ratio(store: ExitStore, depth_budget: float,
                          ratios: tuple[float, ...] = tuple(a / 20 for a in range(6, 21))) -> tuple[float, list]:
    """A for raee-earliest:A, on calibration data only (leave-one-out over the store): the best score among ratios
    whose exits average at most depth_budget * L layers; (A, [(A, score, avg exit)...])."""
    suite, view = PolicySuite(store.records, store.policy), leave_one_out_view(store)
    curve = []
    for ratio in ratios:
        exits = suite.exit_layers(suite.spec(f"raee-earliest:{ratio:g}"), view)
        layers_run = np.maximum(exits, store.key.layer or 0)
        predicted = view.label_logits[np.arange(len(exits)), exits].argmax(axis=1)
        curve.append((ratio, task_score(store.task.metric, predicted, view.gold), float(layers_run.mean())))
    inside = [c for c in curve if c[2] <= depth_budget * store.num_layers] or [min(curve, key=lambda c: c[2])]
    return max(inside, key=lambda c: (round(c[1], 6), -c[2]))[0], curve


class Evaluator:
    """Scores and times policies for one engine on one test set."""

    def __init__(self, engine: Engine, examples: list[Example], batch_size: int = 64, progress: bool = True) -> None:
        examples, _ = readable_examples(engine.backbone, engine.task, examples, "test items")
        self.engine, self.examples = engine, examples
        self.suite = PolicySuite(engine.store.records, engine.policy)
        self.view = test_view(engine, examples, batch_size, progress)
        self.key_layer = engine.store.key.layer or 0

    def score(self, name: str) -> tuple[PolicySpec, float, np.ndarray]:
        spec = self.suite.spec(name)
        exits = self.suite.exit_layers(spec, self.view)
        predicted = self.view.label_logits[np.arange(len(exits)), exits].argmax(axis=1)
        return spec, task_score(self.engine.task.metric, predicted, self.view.gold), exits

    def evaluate(self, name: str, timing_sample: int = 200) -> PolicyResult:
        spec, score, exits = self.score(name)
        layers_run = np.maximum(exits, self.key_layer) if spec.kind == "raee" else exits
        latency = throughput = None
        if timing_sample > 0:
            latency, throughput = self.time(spec, exits, timing_sample)
        num_layers = self.engine.num_layers
        return PolicyResult(name, self.engine.task.metric, score, float(exits.mean()), float(layers_run.mean()),
                            float(1 - layers_run.mean() / num_layers), latency, throughput)

    def time(self, spec: PolicySpec, exits: np.ndarray, sample: int) -> tuple[float, float]:
        """(p50 ms with one text per call, texts/s in calls of 32), on the first `sample` test texts."""
        texts = [e.text for e in self.examples[:sample]]
        run = self._runner(spec, exits)
        run(texts[:1], slice(0, 1))  # warm-up
        singles = []
        for i in range(len(texts)):
            started = time.perf_counter()
            run(texts[i:i + 1], slice(i, i + 1))
            singles.append((time.perf_counter() - started) * 1e3)
        started = time.perf_counter()
        for i in range(0, len(texts), 32):
            run(texts[i:i + 32], slice(i, min(i + 32, len(texts))))
        return statistics.median(singles), len(texts) / (time.perf_counter() - started)

    def _runner(self, spec: PolicySpec, exits: np.ndarray):
        engine, backbone, head = self.engine, self.engine.backbone, self.engine.head
        prompts = engine.prompting.prompts
        if spec.kind == "fixed":
            policy = "full" if spec.layer == engine.num_layers else f"static:{spec.layer}"
            return lambda batch, _rows: engine.classify(batch, policy=policy)
        if spec.kind == "raee":
            return lambda batch, _rows: engine.classify(batch, raee=spec.raee)
        if spec.kind == "oracle":  # exits known in advance (from the gold label): time the truncated pass alone
            return lambda batch, rows: backbone.finish(backbone.start(prompts(batch)), torch.from_numpy(exits[rows]),
                                                       head)
        if spec.kind == "adainfer":
            svm = self.suite.adainfer()
            stop = lambda _layer, logits: svm.decide(head_features(logits[:, None])[:, 0])  # noqa: E731
        else:
            thresholds = self.suite.thresholds(spec.rate)
            stop = lambda layer, logits: head_features(logits[:, None])[:, 0, 1] >= thresholds[layer]  # noqa: E731
        return lambda batch, _rows: backbone.run_until(backbone.start(prompts(batch)), head, stop)


def markdown_table(results: list[PolicyResult]) -> str:
    lines = ["| policy | score | avg exit layer | layers saved | latency p50 ms (batch 1) | throughput/s (batch 32) |",
             "|---|---|---|---|---|---|"]
    for r in results:
        latency = f"{r.latency_ms_p50:.1f}" if r.latency_ms_p50 is not None else "-"
        throughput = f"{r.throughput_per_s:.0f}" if r.throughput_per_s is not None else "-"
        lines.append(f"| {r.policy} | {100 * r.score:.2f} | {r.avg_exit_layer:.2f} | {r.layers_saved:.0%} | "
                     f"{latency} | {throughput} |")
    return "\n".join(lines)

