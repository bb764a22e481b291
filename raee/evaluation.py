"""Scoring policies on a labelled test file through the serving path (real truncated forwards)."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import numpy as np
from tqdm.auto import tqdm

from raee.data import Example
from raee.engine import Engine
from raee.metrics import task_score


@dataclass(frozen=True)
class PolicyScore:
    policy: str
    metric: str
    score: float
    avg_exit_layer: float
    avg_layers_run: float
    items_per_second: float  # at the batch size used, wall clock of the whole classify calls

    def to_dict(self) -> dict:
        return asdict(self)


def score_policies(engine: Engine, examples: list[Example], policies: list[str], batch_size: int = 32,
                   progress: bool = True) -> list[PolicyScore]:
    """Classify every example under each policy and score it with the task's metric."""
    gold = np.array([e.label for e in examples])
    texts = [e.text for e in examples]
    out = []
    for policy in policies:
        predicted, exits, layers_run = [], [], []
        started = time.perf_counter()
        for start in tqdm(range(0, len(texts), batch_size), desc=policy, disable=not progress, unit="batch"):
            for r in engine.classify(texts[start:start + batch_size], policy=policy):
                predicted.append(r.label_index)
                exits.append(r.exit_layer)
                layers_run.append(r.layers_run)
        seconds = time.perf_counter() - started
        out.append(PolicyScore(policy, engine.task.metric, task_score(engine.task.metric, np.array(predicted), gold),
                               float(np.mean(exits)), float(np.mean(layers_run)), len(texts) / seconds))
    return out


def markdown_table(scores: list[PolicyScore], num_layers: int) -> str:
    lines = ["| policy | score | avg exit layer | avg layers run | layers saved | items/s |", "|---|---|---|---|---|---|"]
    for s in scores:
        lines.append(f"| {s.policy} | {100 * s.score:.2f} | {s.avg_exit_layer:.2f} | {s.avg_layers_run:.2f} | "
                     f"{1 - s.avg_layers_run / num_layers:.0%} | {s.items_per_second:.0f} |")
    return "\n".join(lines)
