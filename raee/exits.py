"""Exit layers for a retrieval policy, from its neighbours: the one place the engine and evaluation both decide.

`resolve` turns a typed ExitPolicy into the rule and off-domain gate it means for one store; `decide` applies them
to a batch's neighbours. Pure functions over arrays (no torch, no faiss).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from typing import Literal

import numpy as np

from raee.accuracy_rule import (
    AccuracyRuleConfig,
    RecordValues,
    accuracy_exit_layers,
    estimated_accuracy,
    weighted_records,
)
from raee.calibration import CalibratedPolicy, Rule
from raee.errors import InputError
from raee.exit_policy import ExitPolicy
from raee.offdomain import OffDomainGate, off_domain_reasons
from raee.raee_rule import RaeeConfig, exit_layers_from_scores, layer_scores
from raee.records import ExitRecords


@dataclass
class RecordArrays:
    """The store's records in the forms the rules read, computed once per store."""

    records: ExitRecords
    _values: dict[str, np.ndarray] = field(default_factory=dict)
    _means: dict[str, np.ndarray] = field(default_factory=dict)

    def values(self, kind: RecordValues | Literal["probability", "labels"]) -> np.ndarray:
        """(N, L+1): "correct", "confidence" (the accuracy rule's) or "probability" (RAEE's records); "labels":
        (N, C) the items' gold labels one-hot (what the accuracy rule's votes count)."""
        if kind not in self._values:
            self._values[kind] = (self.records.record_probability() if kind == "probability" else
                                  self.records.gold_one_hot if kind == "labels"
                                  else self.records.record_values(kind))
        return self._values[kind]

    def mean(self, kind: RecordValues | Literal["labels"]) -> np.ndarray:
        """values(kind) averaged over the store's items (what the accuracy rule shrinks to)."""
        if kind not in self._means:
            self._means[kind] = self.values(kind).mean(axis=0)
        return self._means[kind]

    @property
    def num_layers(self) -> int:
        return self.records.num_layers


@dataclass(frozen=True)
class Resolved:
    """What a policy means for one store: a rule and a gate, or a fixed exit layer."""

    rule: Rule | None = None
    gate: OffDomainGate | None = None
    fixed_layer: int | None = None

    @property
    def search_width(self) -> int:
        """Neighbours to retrieve: as many as the rule and the gate read."""
        return max(self.rule.k if self.rule is not None else 0, self.gate.agreement_k if self.gate else 0)

    @property
    def reads_predictions(self) -> bool:
        """The rule reads the query's own predictions at the layers its prefix key ran (key_layers=votes)."""
        return isinstance(self.rule, AccuracyRuleConfig) and self.rule.key_layers == "votes"

    @cached_property
    def agreement_rule(self) -> AccuracyRuleConfig | None:
        """The weights the gate's agreement reads its neighbours with (made once: the engine keeps its Resolved)."""
        gate = self.gate
        return None if gate is None else AccuracyRuleConfig(k=gate.agreement_k, temperature=gate.agreement_temperature)


@dataclass(frozen=True)
class Decision:
    exits: np.ndarray  # (Q,) exit layer of each query
    off_domain: np.ndarray  # (Q,) str: "" in-domain, else far / disagree / shifted (sent to the fallback layer)
    no_evidence: np.ndarray  # (Q,) bool: no neighbour had an exit record, so the rule ran full depth


def resolve(policy: ExitPolicy, calibrated: CalibratedPolicy, raee: RaeeConfig, num_layers: int) -> Resolved:
    """The rule and gate `policy` means, given the store's calibrated policy (for `calibrated`, the one its
    objective chose) and its faithful RAEE settings."""
    policy.check_layers(num_layers)
    if policy.kind == "full":
        return Resolved(fixed_layer=num_layers)
    if policy.kind == "static":
        return Resolved(fixed_layer=policy.layer)
    if policy.kind == "raee":
        return Resolved(rule=policy.rule_config(raee))
    if policy.kind == "accuracy":
        return Resolved(rule=policy.rule_config(AccuracyRuleConfig()))
    if policy.kind == "calibrated":
        if calibrated.rule is None:
            return Resolved(fixed_layer=num_layers)
        return Resolved(rule=policy.rule_config(calibrated.rule), gate=calibrated.gate)
    raise InputError(f"policy {policy} does not choose its exit from neighbours; the engine serves "
                     "calibrated, raee, accuracy, full and static:L")


def decide(resolved: Resolved, similarities: np.ndarray, neighbour_ids: np.ndarray, arrays: RecordArrays,
           key_layer: int, alarms: np.ndarray | None = None, predicted: np.ndarray | None = None) -> Decision:
    """Exit layers for Q queries from their neighbours (Q, >= search_width; -1 = none). alarms (Q,): the stream
    test's verdict for each query, from the caller's StreamMonitor (None: no alarm). predicted (Q, K+1): each
    query's predicted label at the layers its prefix key ran, which an accuracy rule with key_layers=votes reads
    (None: not known, as with an embedder key)."""
    q, num_layers = len(similarities), arrays.num_layers
    rule = resolved.rule
    sums: dict[tuple[str, int, float], tuple[np.ndarray, np.ndarray]] = {}  # weighted_records by (values, k, T)
    if rule is None:
        raise InputError("a fixed-exit policy has no neighbours to decide from")
    if isinstance(rule, RaeeConfig):
        scores = layer_scores(similarities, neighbour_ids, arrays.values("probability"), rule)
        exits = exit_layers_from_scores(scores, rule.earliest_ratio)
        no_evidence = scores.max(axis=1) <= 0
    else:
        weighted = weighted_records(similarities, neighbour_ids, arrays.values(rule.values), rule.k, rule.temperature)
        sums[(rule.values, rule.k, rule.temperature)] = weighted  # the gate's agreement may read the same sums
        exits = accuracy_exit_layers(similarities, neighbour_ids, arrays.values(rule.values), rule, key_layer,
                                     arrays.mean(rule.values), weighted, labels=arrays.values("labels"),
                                     predicted=predicted, label_mean=arrays.mean("labels"))
        no_evidence = ~(neighbour_ids[:, :rule.k] >= 0).any(axis=1)
    reasons = np.full(q, "", dtype=object)
    gate = resolved.gate
    agreement_rule = resolved.agreement_rule
    if gate is not None and agreement_rule is not None:
        shared = sums.get(("correct", agreement_rule.k, agreement_rule.temperature))
        agreement = estimated_accuracy(similarities, neighbour_ids, arrays.values("correct"), agreement_rule,
                                       prior=False, weighted=shared)[np.arange(q), exits]
        nearest = np.where(neighbour_ids[:, 0] >= 0, similarities[:, 0], -np.inf)
        reasons = off_domain_reasons(gate, nearest, agreement, alarms if alarms is not None else np.zeros(q, bool))
        fallback = num_layers if gate.fallback_layer is None else gate.fallback_layer
        exits = np.where(reasons != "", fallback, exits)
    return Decision(exits, reasons.astype(str), no_evidence)
