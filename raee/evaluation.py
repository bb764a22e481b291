"""Side-by-side evaluation of exit policies on a labelled test file.

Scores come from one pass over the test items that records every layer's head output (a truncated forward to
layer l gives exactly the full pass's layer-l output; the backbone tests prove it), so every policy is scored on the
same per-layer predictions; retrieval policies decide exactly as the engine does (raee/exits.py), on neighbours
searched as wide as the widest policy asks. Speed comes from real truncated forwards on a sample, run as each policy
runs online: the engine for retrieval and fixed exits, the head read at every layer for AdaInfer and confidence,
a truncated pass at known exits for the oracle.

Test texts that appear verbatim in the store are scored apart as well: retrieval finds such a text's twin at
similarity 1 and copies its record, so whole-file scores flatter retrieval where test and calibration overlap.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from raee.baselines import (
    DEFAULT_AGREEMENT,
    LinearSVM,
    adainfer_exit_layers,
    calibrate_confidence,
    confidence_exit_layers,
    fit_adainfer,
    head_features,
    oracle_exit_layers,
)
from raee.build import BATCH_SIZE, readable_examples
from raee.data import Example, seen_texts
from raee.engine import Engine
from raee.errors import InputError
from raee.exit_policy import ExitPolicy
from raee.exits import RecordArrays, Resolved, decide
from raee.guarantee import harms_and_helps
from raee.index import search
from raee.keys import require_embedder
from raee.metrics import task_score
from raee.offdomain import conformal_pvalues, cusum_alarms
from raee.records import layers_run, predictions_at


@dataclass(frozen=True)
class PolicyResult:
    policy: str
    metric: str
    score: float  # whole test file
    score_unseen: float  # test texts not in the store verbatim
    accuracy: float
    accuracy_full: float  # full depth's, for the guarantee
    avg_exit_layer: float
    avg_layers_run: float  # a retrieval policy with a prefix key runs at least K layers
    layers_saved: float  # 1 - avg_layers_run / L
    off_domain: float  # share of texts the off-domain gate sent to full depth
    off_domain_reasons: dict[str, int]  # texts per reason: far, disagree, shifted
    harms: int  # texts right at full depth but wrong at this policy's exit
    helps: int  # texts wrong at full depth but right at the exit
    guarantee: str  # "held" / "missed": match-full's accuracy within epsilon of full depth's, best's layers run
    # within its depth budget; "" = none claimed
    latency_ms_p50: float | None  # one text per call
    throughput_per_s: float | None  # texts per second in calls of 32

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class TestView:
    """What policies may look at for Q test items (gold only for the oracle and scoring)."""

    label_logits: np.ndarray  # (Q, L+1, C) head outputs at every layer
    vocab_top2: np.ndarray | None  # (Q, L+1, 2) full-vocabulary top-two probabilities (LM backbones)
    similarities: np.ndarray  # (Q, width) to the store's neighbours, closest first
    neighbour_ids: np.ndarray  # (Q, width), -1 = none
    gold: np.ndarray  # (Q,)
    seen: np.ndarray  # (Q,) bool: the text appears verbatim in the store

    @property
    def num_layers(self) -> int:
        return self.label_logits.shape[1] - 1


def test_view(engine: Engine, examples: list[Example], width: int, batch_size: int = BATCH_SIZE,
              progress: bool = True) -> TestView:
    """One pass over the test items: every layer's head output, the key, and `width` neighbours."""
    texts = [e.text for e in examples]
    key = engine.store.key
    logits, vocab, keys = [], [], []
    for start in tqdm(range(0, len(texts), batch_size), desc="test pass", unit="batch", disable=not progress):
        batch = texts[start:start + batch_size]
        layer_pass = engine.backbone.all_layers(engine.prompting.prompts(batch), engine.head, with_vocab_top2=True,
                                                pooled_layers=(key.layer,) if key.layer is not None else ())
        logits.append(layer_pass.label_logits)
        vocab.append(layer_pass.vocab_top2)
        keys.append(layer_pass.pooled[key.layer] if key.layer is not None else
                    require_embedder(engine.embedder).encode(batch))
    sims, ids = search(engine.index, np.concatenate(keys), max(width, 1))
    return TestView(np.concatenate(logits), None if any(v is None for v in vocab) else np.concatenate(vocab), sims,  # type: ignore[arg-type]
                    ids, np.array([e.label for e in examples]), seen_texts(texts, engine.store.texts))


class Evaluator:
    """Scores and times policies for one engine on one test set. Test items longer than the backbone reads are
    skipped, or with truncate cut to fit (raee.truncation) and counted in `truncated`."""

    def __init__(self, engine: Engine, examples: list[Example], policies: Sequence[ExitPolicy | str],
                 batch_size: int = BATCH_SIZE, progress: bool = True, truncate: bool = False) -> None:
        self.truncated = 0
        if truncate:
            texts, cut = engine.fit([e.text for e in examples])
            examples = [replace(e, text=text) for e, text in zip(examples, texts)]
            self.truncated = sum(cut)
        examples, _ = readable_examples(engine.backbone, engine.task, examples, "test items")
        if not examples:
            raise InputError("no test items left to score")
        self.engine, self.examples = engine, examples
        width = max([engine.resolve(p).search_width for p in map(ExitPolicy.parse, policies) if p.uses_neighbours]
                    or [0])
        self.view = test_view(engine, examples, width, batch_size, progress)
        self.full_accuracy = float(np.mean(self.view.label_logits[:, -1].argmax(axis=1) == self.view.gold))
        self._adainfer: LinearSVM | None = None
        self._thresholds: dict[float, np.ndarray] = {}

    def exits(self, policy: ExitPolicy) -> tuple[np.ndarray, np.ndarray]:
        """(exit layers (Q,), off-domain reasons (Q,)) of a policy on the test items, in file order."""
        view, q = self.view, len(self.view.gold)
        none = np.full(q, "")
        if policy.kind == "oracle":
            return oracle_exit_layers(view.label_logits, view.gold), none
        if policy.kind == "adainfer":
            return adainfer_exit_layers(self.adainfer(), view.label_logits, view.vocab_top2), none
        if policy.kind == "confidence":
            return confidence_exit_layers(self.thresholds(policy.rate or DEFAULT_AGREEMENT), view.label_logits), none
        key_layer = self.engine.store.key_layer
        return served_exits(self.engine.resolve(policy), view.similarities, view.neighbour_ids, self.engine.arrays,
                            key_layer, view.label_logits[:, :key_layer + 1].argmax(axis=2))

    def adainfer(self) -> LinearSVM:
        if self._adainfer is None:
            self._adainfer = fit_adainfer(self.engine.store.records)
        return self._adainfer

    def thresholds(self, rate: float) -> np.ndarray:
        if rate not in self._thresholds:
            self._thresholds[rate] = calibrate_confidence(self.engine.store.records, rate)
        return self._thresholds[rate]

    def layers_run(self, policy: ExitPolicy, exits: np.ndarray) -> np.ndarray:
        """(Q,) layers each text ran: a retrieval policy has run the prefix key's layers before it exits."""
        return layers_run(exits, self.engine.store.key_layer) if policy.uses_neighbours else exits

    def score(self, exits: np.ndarray, rows: np.ndarray | None = None) -> float:
        view = self.view
        predicted = predictions_at(view.label_logits, exits)
        if rows is None:
            return task_score(self.engine.task.metric, predicted, view.gold)
        return task_score(self.engine.task.metric, predicted[rows], view.gold[rows]) if rows.any() else float("nan")

    def evaluate(self, name: ExitPolicy | str, timing_sample: int = 200) -> PolicyResult:
        policy = ExitPolicy.parse(name)
        exits, off_domain = self.exits(policy)
        right = predictions_at(self.view.label_logits, exits) == self.view.gold
        harms, helps = harms_and_helps(self.view.label_logits[:, -1].argmax(axis=1) == self.view.gold, right)
        accuracy = float(right.mean())
        reasons = {reason: int((off_domain == reason).sum()) for reason in ("far", "disagree", "shifted")}
        layers_run = self.layers_run(policy, exits)
        latency = throughput = None
        if timing_sample > 0 and self.timeable(policy):
            latency, throughput = self.time(policy, exits, timing_sample)
        num_layers = self.engine.num_layers
        return PolicyResult(
            str(name), self.engine.task.metric, self.score(exits), self.score(exits, ~self.view.seen), accuracy,
            self.full_accuracy, float(exits.mean()), float(layers_run.mean()),
            float(1 - layers_run.mean() / num_layers), float(np.mean(off_domain != "")), reasons, harms, helps,
            self.guarantee(policy, accuracy, float(layers_run.mean()) / num_layers), latency, throughput)

    def guarantee(self, policy: ExitPolicy, accuracy: float, layers_share: float) -> str:
        """For a calibrated policy, whether its guarantee held on this file: match-full's accuracy within epsilon
        of full depth's, best's share of the layers run within its depth budget."""
        if policy.kind != "calibrated":
            return ""
        settings = self.engine.calibrated(policy.objective).settings
        if settings.objective == "match-full":
            return "held" if accuracy >= self.full_accuracy - settings.epsilon - 1e-12 else "missed"
        if settings.objective == "best":
            return "held" if layers_share <= settings.depth_budget + 1e-12 else "missed"
        return ""

    def time(self, policy: ExitPolicy, exits: np.ndarray, sample: int) -> tuple[float, float]:
        """(p50 ms with one text per call, texts/s in calls of 32), on the first `sample` test texts."""
        texts = [e.text for e in self.examples[:sample]]
        run = self.runner(policy, exits)
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

    def runner(self, policy: ExitPolicy, exits: np.ndarray) -> Callable[[list[str], slice], Any]:
        """A function (texts, rows) that runs the policy online on those test rows."""
        engine, backbone, head = self.engine, self.engine.backbone, self.engine.head
        prompts = engine.prompting.prompts
        if policy.kind == "oracle":  # exits known in advance (from the gold label): time the truncated pass alone
            return lambda batch, rows: backbone.finish(backbone.start(prompts(batch)), torch.from_numpy(exits[rows]),
                                                       head)
        if policy.kind == "adainfer":
            svm = self.adainfer()
            stop = lambda _layer, logits: svm.decide(head_features(logits[:, None])[:, 0])  # noqa: E731
        elif policy.kind == "confidence":
            thresholds = self.thresholds(policy.rate or DEFAULT_AGREEMENT)
            stop = lambda layer, logits: head_features(logits[:, None])[:, 0, 1] >= thresholds[layer]  # noqa: E731
        else:
            return lambda batch, _rows: engine.classify(batch, policy=policy)
        return lambda batch, _rows: backbone.run_until(backbone.start(prompts(batch)), head, stop)

    def timeable(self, policy: ExitPolicy) -> bool:
        """AdaInfer over full-vocabulary features cannot run online here (the head run reads label words only)."""
        return not (policy.kind == "adainfer" and self.engine.store.records.vocab_top2 is not None)


def served_exits(resolved: Resolved, similarities: np.ndarray, neighbour_ids: np.ndarray, arrays: RecordArrays,
                 key_layer: int, predicted: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(exit layers (Q,), off-domain reasons (Q,), "" where none) of a resolved policy for queries served in order
    from their neighbours (Q, >= its search width), as a file is served: the stream test runs over them in order
    from a fresh state. predicted (Q, K+1): each query's predicted label at layers 0..K (decide)."""
    if resolved.fixed_layer is not None:
        q = len(neighbour_ids)
        return np.full(q, resolved.fixed_layer), np.full(q, "")
    alarms = None
    if resolved.gate is not None:
        nearest = np.where(neighbour_ids[:, 0] >= 0, similarities[:, 0], -np.inf)
        alarms, _ = cusum_alarms(conformal_pvalues(resolved.gate, nearest), 0.0, resolved.gate)
    decision = decide(resolved, similarities, neighbour_ids, arrays, key_layer, alarms, predicted)
    return decision.exits, decision.off_domain


def markdown_table(results: list[PolicyResult]) -> str:
    lines = ["| policy | score | unseen only | avg exit layer | layers run | off-domain | right/wrong vs full | "
             "guarantee | latency p50 ms (batch 1) | throughput/s (batch 32) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        latency = f"{r.latency_ms_p50:.1f}" if r.latency_ms_p50 is not None else "-"
        throughput = f"{r.throughput_per_s:.0f}" if r.throughput_per_s is not None else "-"
        lines.append(f"| {r.policy} | {100 * r.score:.2f} | {100 * r.score_unseen:.2f} | {r.avg_exit_layer:.2f} | "
                     f"{1 - r.layers_saved:.0%} | {r.off_domain:.0%} | +{r.helps} / -{r.harms} | "
                     f"{r.guarantee or '-'} | {latency} | {throughput} |")
    return "\n".join(lines)
