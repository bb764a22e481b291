"""Build-time calibration: choose the served policy's settings on the calibration items only.

Every calibration item is queried against the store without it, and without any item of the same text (a
duplicate would hand it its own record): leave-one-out. Along a path of settings, from cautious to aggressive, each
setting's exits give a calibration score, the share of layers run (the prefix key's layers counted) and the paired
losses against full depth. The objective picks one setting:

- match-full (the default): the fewest layers whose accuracy is no more than epsilon below full depth's, with
  probability at least 1 - delta, both in expectation (an exact test) and as measured on a file of query_items
  queries (a normal approximation). The path is the accuracy rule's (raee/accuracy_rule.py) at its default
  structure: margin from 1 down to 0, then cost up; each setting is tested in turn (raee/guarantee.py: both tests
  must reject "more than epsilon below") and the last one accepted before the first rejection is served
  (fixed-sequence testing, Learn then Test). The rule's structure (k, temperature, prior, values) is not chosen
  here: choosing it on the same items would spend the guarantee.
- best: the highest calibration score among settings certified to stay within a depth budget, over several
  structures of the accuracy rule and the raee-earliest path. The budget is a guarantee: along each path, from the
  cheapest setting up, H0 "layers run exceed the budget on average" is tested by betting (raee/guarantee.py) at
  level delta / (number of paths) and the settings before the first one not rejected are certified (fixed-sequence
  testing, Bonferroni over paths), so the served setting runs at most the budget on average with probability at
  least 1 - delta. If none is certified (a budget below what any setting reaches, or too few items to tell), the
  cheapest setting is served without the guarantee, and the evidence and summary say so (its `accepted` is
  False). The score is an estimate, with no guarantee.
- raee: faithful RAEE, the store's RAEE settings.
match-full and best also calibrate the off-domain gate (raee/offdomain.py); its per-query tests are part of every
setting the path tries, so the guarantee covers them. Pure functions over arrays; the search is raee/index.py's.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from typing import Any, get_args

import numpy as np

from raee.accuracy_rule import (
    KEY_LAYERS,
    AccuracyRuleConfig,
    KeyLayers,
    RecordValues,
    estimated_accuracy,
    exit_layers_from_estimate,
    rule_estimate,
)
from raee.errors import InputError, StoreError
from raee.exit_policy import OBJECTIVES, ExitPolicy, Objective, PolicyKind
from raee.guarantee import (
    GAMMA_SHARE,
    PairedRiskTest,
    certified_within_budget,
    file_risk_pvalue,
    fixed_sequence,
    harms_and_helps,
)
from raee.metrics import task_score
from raee.offdomain import OffDomainGate, agreement_threshold, fit_similarity, off_domain_reasons
from raee.raee_rule import RaeeConfig, exit_layers_from_scores, layer_scores
from raee.records import ExitRecords, layers_run, predictions_at

log = logging.getLogger(__name__)

MARGINS = tuple(round(1 - i / 50, 2) for i in range(51))  # 1.0, 0.98, ..., 0: from full depth to the best layer
COSTS = tuple(round(i / 50, 2) for i in range(1, 101))  # 0.02 ... 2.0: then ever cheaper
EARLIEST_RATIOS = tuple(round(1 - i / 20, 2) for i in range(19))  # 1.0 ... 0.1
BEST_STRUCTURES = tuple(AccuracyRuleConfig(k=k, temperature=t, values=v) for k, t, v in
                        itertools.product((32, 64), (0.05, 0.1), get_args(RecordValues)))
SEARCH_WIDTH = max(64, *(s.k for s in BEST_STRUCTURES))  # neighbours every candidate may read
Rule = RaeeConfig | AccuracyRuleConfig
QUERY_ITEMS = 2000  # match-full's file-level claim: the size of a test file of the shared tasks (1043-2210 items)


@dataclass(frozen=True)
class CalibrationSettings:
    """What `raee-index build --objective ...` asks for; saved in the store beside what it chose."""

    objective: Objective = "match-full"  # match-full | best | raee
    epsilon: float = 0.005  # match-full: accuracy may fall this far below full depth's (0.005 = 0.5 point) ...
    delta: float = 0.1  # ... except with probability at most delta ...
    query_items: int = QUERY_ITEMS  # ... also as measured on a file of this many queries (0: in expectation only)
    depth_budget: float = 0.6  # best: the most layers run on average, as a share of all layers
    gate_alpha: float = 0.02  # off-domain gate: share of in-domain queries its per-query tests flag; 0 = no gate
    stream_p: float = 1e-3  # off-domain gate: in-domain false alarms of the stream test per query; 0 = no stream test
    key_layers: KeyLayers = "records"  # the accuracy rule's estimate for the key's layers 0..K: a build sets "votes"
    # for a prefix key (raee.build.build_store); a store built before votes reads "records", and is recalibrated so

    def __post_init__(self) -> None:
        if self.objective not in OBJECTIVES:
            raise InputError(f"objective {self.objective!r} is not one of {', '.join(OBJECTIVES)}")
        if not 0 <= self.epsilon < 1:
            raise InputError(f"epsilon must lie in [0, 1), got {self.epsilon}")
        if not 0 < self.delta < 1:
            raise InputError(f"delta must lie in (0, 1), got {self.delta}")
        if self.query_items < 0:
            raise InputError(f"query items must be 0 or more, got {self.query_items}")
        if not 0 < self.depth_budget <= 1:
            raise InputError(f"depth budget must lie in (0, 1], got {self.depth_budget}")
        if not 0 <= self.gate_alpha < 0.5:
            raise InputError(f"gate alpha must lie in [0, 0.5), got {self.gate_alpha}")
        if not 0 <= self.stream_p < 1:
            raise InputError(f"stream p must lie in [0, 1), got {self.stream_p}")
        if self.key_layers not in KEY_LAYERS:
            raise InputError(f"key_layers {self.key_layers!r} is not one of {', '.join(KEY_LAYERS)}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "CalibrationSettings":
        return cls(**{"query_items": 0, **values})  # a store built before the file-level claim made none


@dataclass(frozen=True)
class CurvePoint:
    """One setting on the calibration path, scored leave-one-out on the calibration items."""

    setting: str  # the rule and its settings, as a policy string
    score: float  # task metric (accuracy, or Matthews correlation)
    accuracy: float
    layers_run: float  # share of all layers run on average, the prefix key's counted
    off_domain: float  # share of calibration items the gate sent to full depth
    harms: int  # right at full depth, wrong at this setting's exit
    helps: int  # wrong at full depth, right at the exit
    risk_bound: float  # 1 - delta upper confidence bound on (full depth's accuracy - this accuracy)
    accepted: bool | None = None  # in sequence, match-full: rejected "more than epsilon below full depth";
    # best: rejected "more than the depth budget" (certified within it)


@dataclass(frozen=True)
class CalibrationEvidence:
    num_items: int  # calibration items, each queried leave-one-out
    full_score: float
    full_accuracy: float
    curve: tuple[CurvePoint, ...]  # the chosen rule's path, cautious to aggressive
    chosen: int  # index into curve; -1 = full depth (nothing passed)
    candidates: int  # settings tried in all
    seconds: float
    keys: tuple["KeyTrial", ...] = ()  # a build that chose its key (--key auto): every key it calibrated

    def to_dict(self) -> dict[str, Any]:
        values = asdict(self)
        if not self.keys:
            del values["keys"]  # a store that did not choose its key reads as before (older releases refuse "keys")
        return values

    @property
    def keys_tried(self) -> int:
        """How many keys the build calibrated to choose this store's: its guarantee was tested at delta over this."""
        return max(1, len(self.keys))

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "CalibrationEvidence":
        return cls(**{**values, "curve": tuple(CurvePoint(**p) for p in values["curve"]),
                      "keys": tuple(KeyTrial(**k) for k in values.get("keys", ()))})


@dataclass(frozen=True)
class KeyTrial:
    """One key a build calibrated before choosing (raee.build.choose_key)."""

    key: str
    policy: str  # the policy its calibration chose
    score: float  # calibration score at that policy
    layers_run: float  # share of the layers run at that policy (1.0 for full depth)
    delta: float  # the level its guarantee was tested at: the build's delta over the number of keys
    certified: bool = True  # best: its setting is certified within the depth budget (False: the uncertified
    # cheapest was served); match-full and raee: always True (full depth, when nothing passed, meets the objective)


@dataclass(frozen=True)
class CalibratedPolicy:
    """The policy a store serves by default: a rule with its settings and the off-domain gate, or full depth."""

    settings: CalibrationSettings
    rule: Rule | None  # None: full depth
    gate: OffDomainGate | None

    @property
    def name(self) -> str:
        """The rule as a policy string, e.g. accuracy:cost=0.3,k=64,... (full when nothing passed)."""
        if self.rule is None:
            return "full"
        kind: PolicyKind = "raee" if isinstance(self.rule, RaeeConfig) else "accuracy"
        return str(ExitPolicy(kind, options=tuple(asdict(self.rule).items())))

    @property
    def k(self) -> int:
        return self.rule.k if self.rule is not None else 0

    def to_dict(self) -> dict[str, Any]:
        rule = None if self.rule is None else {
            "name": "raee" if isinstance(self.rule, RaeeConfig) else "accuracy", **self.rule.to_dict()}
        return {"settings": asdict(self.settings), "rule": rule,
                "gate": self.gate.to_dict() if self.gate is not None else None}

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "CalibratedPolicy":
        try:
            rule = values["rule"]
            if rule is not None:
                rule = dict(rule)
                rule = (RaeeConfig if rule.pop("name") == "raee" else AccuracyRuleConfig).from_dict(rule)
            gate = OffDomainGate.from_dict(values["gate"]) if values.get("gate") else None
            return cls(CalibrationSettings.from_dict(values["settings"]), rule, gate)
        except (KeyError, TypeError) as exc:
            raise StoreError(f"the store's calibrated policy is malformed ({exc}); rebuild the store") from None


@dataclass
class _Candidate:
    rule: Rule
    exits: np.ndarray  # (N,) exit layers after the gate
    gated: np.ndarray  # (N,) bool
    gate: OffDomainGate | None


# (rule, exits (N,)) -> the candidate with the off-domain gate applied
GateMaker = Callable[[Rule, np.ndarray], _Candidate]


def calibrate(records: ExitRecords, similarities: np.ndarray, neighbour_ids: np.ndarray, *, key_layer: int,
              metric: str, raee: RaeeConfig,
              settings: CalibrationSettings) -> tuple[CalibratedPolicy, CalibrationEvidence]:
    """Choose the served policy. similarities, neighbour_ids: (N, >= SEARCH_WIDTH) leave-one-out neighbours of
    every calibration item (-1 = none); key_layer: the prefix key's layer (0 for an embedder key). Every accuracy-rule
    structure searched reads the key's layers as settings.key_layers says."""
    started = time.perf_counter()
    n, num_layers = records.num_items, records.num_layers
    if neighbour_ids.shape[0] != n:
        raise InputError(f"{neighbour_ids.shape[0]} neighbour rows for {n} calibration items")
    gated = gate_maker(records, similarities, neighbour_ids, settings)
    if settings.objective == "match-full":
        paths = [list(accuracy_path(records, similarities, neighbour_ids, structure(AccuracyRuleConfig(), settings),
                                    key_layer, gated))]
    elif settings.objective == "best":
        paths = [list(accuracy_path(records, similarities, neighbour_ids, structure(s, settings), key_layer,
                                    gated)) for s in BEST_STRUCTURES]
        paths.append(list(_raee_path(records, similarities, neighbour_ids, raee, gated)))
    else:
        paths = [list(_raee_path(records, similarities, neighbour_ids, raee, lambda rule, exits: _Candidate(
            rule, exits, np.zeros(n, dtype=bool), None)))]
    curves = [[_point(c, records, metric, key_layer) for c in path] for path in paths]
    if settings.objective == "best":
        curves = [_certify_budget(path, curve, records.num_layers, key_layer, settings.depth_budget,
                                  settings.delta / len(paths)) for path, curve in zip(paths, curves)]
    chosen_path, chosen, curve = _choose(curves, n, settings)
    if settings.objective == "best" and chosen >= 0 and not curve[chosen].accepted:
        log.warning("no setting is certified to run at most %.0f%% of the layers: the cheapest is served, without "
                    "the guarantee", 100 * settings.depth_budget)
    gamma = GAMMA_SHARE * settings.delta
    curve = [dataclasses.replace(p, risk_bound=PairedRiskTest.of(p.harms, p.helps, n, gamma).upper_bound(
        settings.delta)) for p in curve]
    if chosen >= 0:
        c = paths[chosen_path][chosen]
        policy = CalibratedPolicy(settings, c.rule, None if settings.gate_alpha == 0 and settings.stream_p == 0
                                  else c.gate)
    else:
        policy = CalibratedPolicy(settings, None, None)
    full_score = task_score(metric, records.predicted[:, num_layers], records.gold)
    evidence = CalibrationEvidence(n, full_score, float(records.correct[:, num_layers].mean()), tuple(curve), chosen,
                                   sum(len(p) for p in paths), round(time.perf_counter() - started, 3))
    return policy, evidence


def structure(base: AccuracyRuleConfig, settings: CalibrationSettings) -> AccuracyRuleConfig:
    """The accuracy rule's structure as calibration searches it: the key's layers read as the settings say."""
    return dataclasses.replace(base, key_layers=settings.key_layers)


def key_layers_for(key_source: str) -> KeyLayers:
    """What a build reads the key's layers by: a prefix key's by the neighbours' votes for the query's own answers
    there (raee/accuracy_rule.py); an embedder key has run no layer when the exit is chosen, so by the records."""
    return "votes" if key_source == "prefix" else "records"


def gate_maker(records: ExitRecords, similarities: np.ndarray, neighbour_ids: np.ndarray,
               settings: CalibrationSettings) -> GateMaker:
    """A function (rule, exits) -> _Candidate that applies the off-domain gate calibrated for those exits: the far
    threshold from the items' nearest similarities, the disagree threshold from their agreement at these exits."""
    n, num_layers = records.num_items, records.num_layers
    nearest = np.where(neighbour_ids[:, 0] >= 0, similarities[:, 0], -np.inf)
    far_threshold, quantiles = fit_similarity(nearest, settings.gate_alpha)
    agreement_rule = AccuracyRuleConfig()
    agreement_table = estimated_accuracy(similarities, neighbour_ids, records.record_values("correct"),
                                         agreement_rule, prior=False)  # (N, L+1)
    no_alarms = np.zeros(n, dtype=bool)  # the stream test is not simulated: in-domain it rarely fires

    def gated(rule: Rule, exits: np.ndarray) -> _Candidate:
        agreement = agreement_table[np.arange(n), exits]
        gate = OffDomainGate(settings.gate_alpha, far_threshold, agreement_threshold(agreement, settings.gate_alpha),
                             agreement_rule.k, agreement_rule.temperature, quantiles, n, settings.stream_p)
        off = off_domain_reasons(gate, nearest, agreement, no_alarms) != ""
        return _Candidate(rule, np.where(off, num_layers, exits), off, gate)
    return gated


def _layers_share(c: _Candidate, num_layers: int, key_layer: int) -> np.ndarray:
    """(N,) each item's share of the layers run at this setting: the prefix key's counted, a gated item all."""
    return np.where(c.gated, num_layers, layers_run(c.exits, key_layer)) / num_layers


def _point(c: _Candidate, records: ExitRecords, metric: str, key_layer: int) -> CurvePoint:
    """One setting's calibration figures."""
    n, num_layers = records.num_items, records.num_layers
    exit_right = records.correct[np.arange(n), c.exits]
    harms, helps = harms_and_helps(records.correct[:, num_layers], exit_right)
    layers = _layers_share(c, num_layers, key_layer).mean()
    score = task_score(metric, predictions_at(records.label_logits, c.exits), records.gold)
    return CurvePoint(_rule_name(c.rule), score, float(exit_right.mean()), float(layers), float(c.gated.mean()),
                      harms, helps, float("nan"))


def _certify_budget(path: list[_Candidate], curve: list[CurvePoint], num_layers: int, key_layer: int, budget: float,
                    alpha: float) -> list[CurvePoint]:
    """The curve with `accepted` set: True for the settings certified to run at most `budget` of the layers on
    average, tested at level alpha from the path's cheapest end (its last setting) until the first not rejected."""
    certified = certified_within_budget((_layers_share(c, num_layers, key_layer) for c in reversed(path)), budget,
                                        alpha)
    return [dataclasses.replace(p, accepted=i >= len(curve) - certified) for i, p in enumerate(curve)]


def _choose(curves: list[list[CurvePoint]], n: int,
            settings: CalibrationSettings) -> tuple[int, int, list[CurvePoint]]:
    """(path index, setting index or -1 for full depth, the chosen path's curve) for the objective."""
    if settings.objective == "match-full":
        (curve,) = curves
        gamma = GAMMA_SHARE * settings.delta
        pvalues = [max(PairedRiskTest.of(p.harms, p.helps, n, gamma).pvalue(settings.epsilon),
                       file_risk_pvalue(p.harms, p.helps, n, settings.epsilon, settings.query_items)) for p in curve]
        chosen = fixed_sequence(pvalues, settings.delta)
        return 0, chosen, [dataclasses.replace(p, accepted=i <= chosen) for i, p in enumerate(curve)]
    if settings.objective == "best":
        flat = [(i, j) for i, curve in enumerate(curves) for j in range(len(curve))]
        path, chosen = flat[best_within_budget([curves[i][j].score for i, j in flat],
                                               [curves[i][j].layers_run for i, j in flat],
                                               [bool(curves[i][j].accepted) for i, j in flat])]
        return path, chosen, curves[path]
    return 0, 0, curves[0]


def best_within_budget(scores: list[float], layers_run: list[float], within: list[bool]) -> int:
    """Index of the highest score among settings certified within the depth budget (`within`); ties go to fewer
    layers run (a share), then to the earlier setting. With none certified, the setting running the fewest layers."""
    candidates = range(len(scores))
    inside = [i for i in candidates if within[i]]
    if not inside:
        return min(candidates, key=lambda i: (layers_run[i], -scores[i], i))
    return min(inside, key=lambda i: (-round(scores[i], 9), layers_run[i], i))


def accuracy_path(records: ExitRecords, similarities: np.ndarray, neighbour_ids: np.ndarray,
                  structure: AccuracyRuleConfig, key_layer: int, gated: GateMaker) -> Iterator[_Candidate]:
    """The accuracy rule at one structure, margin from 1 down to 0, then cost up from 0."""
    estimate = calibration_estimate(records, similarities, neighbour_ids, structure, key_layer)
    found = (neighbour_ids[:, :structure.k] >= 0).any(axis=1)
    steps = [(m, 0.0) for m in MARGINS] + [(0.0, c) for c in COSTS]  # (margin, cost)
    for margin, cost in steps:
        rule = dataclasses.replace(structure, margin=margin, cost=cost)
        exits = np.where(found, exit_layers_from_estimate(estimate, rule, key_layer), records.num_layers)
        yield gated(rule, exits)


def calibration_estimate(records: ExitRecords, similarities: np.ndarray, neighbour_ids: np.ndarray,
                         structure: AccuracyRuleConfig, key_layer: int) -> np.ndarray:
    """(N, L+1) the rule's estimate for every calibration item, leave-one-out: its neighbours exclude it, and so do
    the store means its estimate shrinks to (records and labels), so that no item's own record or label enters its
    estimate."""
    values, labels = records.record_values(structure.values), records.gold_one_hot
    n = len(values)

    def without_each(a: np.ndarray) -> np.ndarray:
        return (a.sum(axis=0) - a) / max(n - 1, 1)  # (N, ...) each item's store mean without it
    return rule_estimate(similarities, neighbour_ids, values, structure, key_layer, store_mean=without_each(values),
                         labels=labels, predicted=records.predicted[:, :key_layer + 1],
                         label_mean=without_each(labels))


def _raee_path(records: ExitRecords, similarities: np.ndarray, neighbour_ids: np.ndarray, raee: RaeeConfig,
               gated: GateMaker) -> Iterator[_Candidate]:
    """RAEE at the store's settings, earliest ratio from 1 (faithful) down."""
    scores = layer_scores(similarities, neighbour_ids, records.record_probability(), raee)
    for ratio in EARLIEST_RATIOS:
        rule = dataclasses.replace(raee, earliest_ratio=ratio)
        yield gated(rule, exit_layers_from_scores(scores, ratio))


def _rule_name(rule: Rule) -> str:
    if isinstance(rule, RaeeConfig):
        return f"raee:earliest_ratio={rule.earliest_ratio:g}"
    return f"accuracy:margin={rule.margin:g},cost={rule.cost:g}"

