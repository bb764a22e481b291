"""The one exit-policy type: what the engine, evaluation, the server and the client mean by a policy.

A policy is written NAME, NAME:VALUE or NAME:[VALUE,]KEY=VALUE[,KEY=VALUE...]:

    calibrated[:OBJECTIVE][,k=K]   the store's calibrated policy (the default); with OBJECTIVE (match-full, best,
                                   raee), the one that objective calibrates on the store's items
    raee[:KEY=VALUE,...]           faithful RAEE at the store's settings; keys are RaeeConfig's fields
                                   (k, tau, fallback_top, use_tau, earliest_ratio, weights)
    accuracy[:KEY=VALUE,...]       our accuracy rule at its defaults; keys are AccuracyRuleConfig's fields
                                   (k, temperature, prior, values, margin, cost, key_layers)
    full | static:L                every layer, or always layer L
    oracle | adainfer | confidence[:RATE]   evaluation only: they read the gold label or run the head at every layer

This module imports numpy only (no torch, no faiss), so a client can build and check policies.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Literal, get_args

from raee.accuracy_rule import AccuracyRuleConfig
from raee.errors import InputError
from raee.raee_rule import MAX_K, RaeeConfig

PolicyKind = Literal["calibrated", "raee", "accuracy", "full", "static", "oracle", "adainfer", "confidence"]
POLICY_KINDS: tuple[PolicyKind, ...] = get_args(PolicyKind)
RETRIEVAL_KINDS: tuple[PolicyKind, ...] = ("calibrated", "raee", "accuracy")  # choose the exit from neighbours
ENGINE_KINDS: tuple[PolicyKind, ...] = (*RETRIEVAL_KINDS, "full", "static")  # what Engine.classify serves
Objective = Literal["match-full", "best", "raee"]
OBJECTIVES: tuple[Objective, ...] = get_args(Objective)
MAX_POLICY_CHARS = 200  # longer policy text is refused unread
FORMS = ("calibrated[:OBJECTIVE][,k=K]", "raee[:KEY=VALUE,...]", "accuracy[:KEY=VALUE,...]", "full", "static:L",
         "oracle", "adainfer", "confidence[:RATE]")
_RULE_CONFIGS: dict[str, type[RaeeConfig] | type[AccuracyRuleConfig]] = {"raee": RaeeConfig,
                                                                         "accuracy": AccuracyRuleConfig}

Option = tuple[str, Any]


@dataclass(frozen=True)
class ExitPolicy:
    """A parsed, validated policy. `str(policy)` writes it back in canonical form; `ExitPolicy.parse` reads it."""

    kind: PolicyKind = "calibrated"
    layer: int | None = None  # static:L
    objective: Objective | None = None  # calibrated: None = the store's own
    rate: float | None = None  # confidence: target agreement with full depth
    options: tuple[Option, ...] = ()  # settings over the base (k for calibrated; a rule's fields for raee/accuracy)

    def __post_init__(self) -> None:
        if self.kind not in POLICY_KINDS:
            raise InputError(f"policy kind {self.kind!r} is not one of {', '.join(POLICY_KINDS)}")
        if (self.kind == "static") != (self.layer is not None):
            raise InputError("a static policy needs a layer (static:L), and only it takes one")
        if self.layer is not None and not (isinstance(self.layer, int) and self.layer >= 0):
            raise InputError(f"static layer must be an integer >= 0, got {self.layer!r}")
        if self.objective is not None and (self.kind != "calibrated" or self.objective not in OBJECTIVES):
            raise InputError(f"objective {self.objective!r}: calibrated takes one of {', '.join(OBJECTIVES)}")
        if self.rate is not None and (self.kind != "confidence" or not 0 < self.rate <= 1):
            raise InputError(f"confidence rate must lie in (0, 1], got {self.rate!r}")
        object.__setattr__(self, "options", tuple(sorted(dict(self.options).items())))
        allowed = ({"k"} if self.kind == "calibrated" else
                   set(_RULE_CONFIGS[self.kind].__dataclass_fields__) if self.kind in _RULE_CONFIGS else set())
        unknown = [name for name, _ in self.options if name not in allowed]
        if unknown:
            raise InputError(f"policy {self.kind} takes no setting {unknown[0]!r}"
                             + (f"; valid: {', '.join(sorted(allowed))}" if allowed else ""))
        k = dict(self.options).get("k")
        if k is not None and not (isinstance(k, int) and not isinstance(k, bool) and 1 <= k <= MAX_K):
            raise InputError(f"k {k!r} is out of range 1..{MAX_K}")
        if self.kind in _RULE_CONFIGS:
            self.rule_config(_RULE_CONFIGS[self.kind]())  # refuse settings the rule refuses, now

    # -- reading and writing -----------------------------------------------------------------------------------
    @classmethod
    def parse(cls, text: "str | ExitPolicy") -> "ExitPolicy":
        if isinstance(text, ExitPolicy):
            return text
        if not isinstance(text, str):
            raise InputError(f"a policy is a string like 'raee' or 'static:3', got {type(text).__name__}")
        if len(text) > MAX_POLICY_CHARS:  # refused without echoing it: an error message stays one short line
            raise InputError(f"a policy of {len(text)} characters; the longest form is a few dozen (at most "
                             f"{MAX_POLICY_CHARS})")
        if not text.isascii():  # int() and float() read other scripts' digits: static:\u0663 would be static:3
            raise InputError(f"policy {text!r} holds characters outside ASCII; policies are written like 'raee' or "
                             "'static:3'")
        name, _, rest = text.strip().partition(":")
        items = [item.strip() for item in rest.split(",")] if rest else []
        if name not in POLICY_KINDS or any(not item for item in items):
            raise InputError(f"policy {text!r} is not one of {', '.join(FORMS)}")
        positional = [item for item in items if "=" not in item]
        if len(positional) > 1 or (positional and items[0] != positional[0]):
            raise InputError(f"policy {text!r}: at most one plain value, first (e.g. static:3 or calibrated:best)")
        options = []
        for item in items[len(positional):]:
            key, _, value = item.partition("=")
            options.append((key.strip(), _option_value(name, key.strip(), value.strip())))
        try:
            return cls(name, options=tuple(options), **_positional(name, positional[0] if positional else None))
        except InputError as exc:
            raise InputError(f"policy {text!r}: {exc}") from None

    def __str__(self) -> str:
        head = {"static": self.layer, "calibrated": self.objective,
                "confidence": self.rate}.get(self.kind)
        parts = ([f"{head:g}" if isinstance(head, float) else str(head)] if head is not None else []) + [
            f"{key}={format_value(value)}" for key, value in self.options]
        return self.kind + (":" + ",".join(parts) if parts else "")

    # -- using -------------------------------------------------------------------------------------------------
    @property
    def uses_neighbours(self) -> bool:
        return self.kind in RETRIEVAL_KINDS

    @property
    def k(self) -> int | None:
        """The neighbour count this policy asks for, when it names one."""
        return dict(self.options).get("k")

    def with_k(self, k: int | None) -> "ExitPolicy":
        """The same policy asking for k neighbours (None: unchanged). Only retrieval policies take k."""
        if k is None:
            return self
        if not self.uses_neighbours:
            raise InputError(f"k applies to the retrieval policies ({', '.join(RETRIEVAL_KINDS)}), not {self.kind}")
        return dataclasses.replace(self, options=(*[o for o in self.options if o[0] != "k"], ("k", k)))

    def rule_config(self, base: RaeeConfig | AccuracyRuleConfig) -> Any:
        """`base` with this policy's settings applied (raee: over the store's RAEE settings; accuracy: over the
        rule's defaults; calibrated: k over the calibrated rule's)."""
        try:
            return dataclasses.replace(base, **dict(self.options))
        except TypeError as exc:
            raise InputError(f"policy {self}: {exc}") from None

    def check_layers(self, num_layers: int) -> None:
        """Raise InputError if the policy names a layer the backbone lacks."""
        if self.layer is not None and self.layer > num_layers:
            raise InputError(f"static layer {self.layer} is past the last layer ({num_layers})")


CALIBRATED = ExitPolicy()
FULL = ExitPolicy("full")


def parse_policy_list(text: str) -> list[ExitPolicy]:
    """Policies separated by commas or semicolons: "raee:k=4,tau=0.8,full,static:1". A KEY=VALUE item belongs to
    the policy before it; anything else starts a new policy."""
    groups: list[list[str]] = []
    for part in text.split(";"):
        fresh = True
        for item in (i.strip() for i in part.split(",")):
            if not item:
                continue
            if "=" in item and ":" not in item.split("=", 1)[0] and groups and not fresh:
                groups[-1].append(item)
            else:
                groups.append([item])
            fresh = False
    return [ExitPolicy.parse(",".join(group).replace(",", ":", 1) if ":" not in group[0] and len(group) > 1
                             else ",".join(group)) for group in groups]


def _positional(kind: PolicyKind, value: str | None) -> dict[str, Any]:
    if value is None:
        if kind == "static":
            raise InputError("static needs a layer: static:L")
        return {}
    try:
        if kind == "static":
            return {"layer": int(value)}
        if kind == "confidence":
            return {"rate": float(value)}
    except ValueError:
        raise InputError(f"{value!r} is not a {'layer number' if kind == 'static' else 'rate'}") from None
    if kind == "calibrated":
        return {"objective": value}
    raise InputError(f"{kind} takes no plain value {value!r}")


def _option_value(kind: PolicyKind, key: str, text: str) -> Any:
    """Convert an option's text to its field's type."""
    fields = (_RULE_CONFIGS[kind].__dataclass_fields__ if kind in _RULE_CONFIGS else
              {"k": RaeeConfig.__dataclass_fields__["k"]} if kind == "calibrated" else {})
    if key not in fields:
        valid = f"; valid: {', '.join(fields)}" if fields else ""
        raise InputError(f"policy {kind} takes no setting {key!r}{valid}")
    default = fields[key].default
    try:
        if isinstance(default, bool):
            if text.lower() not in ("true", "false"):
                raise ValueError
            return text.lower() == "true"
        if isinstance(default, int):
            return int(text)
        if isinstance(default, float):
            return float(text)
    except ValueError:
        expected = "true or false" if isinstance(default, bool) else "an integer" if isinstance(default, int) else \
            "a number"
        raise InputError(f"{kind} setting {key}={text!r} is not {expected}") from None
    return text


def format_value(value: Any) -> str:
    """A setting's value as policies write it: true/false, 0.25, 64, correct."""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)
