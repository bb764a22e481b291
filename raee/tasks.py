"""Task definitions: labels, prompt templates and label words per backbone kind, and the metric.

The eight built-in tasks follow the RAEE reference prompts (../shared/RAEE.md and the reference code's scripts). A
template holds `{x}` for the input text and, for masked LMs, `{mask}` for the mask token. Label words are read as
single space-prefixed tokens. The sentence-encoder kind compares the input with one or more verbalizations per
label instead of label words.

A backbone knows no task: `TaskDefinition.prompting(kind, mask_token)` gives what a backbone of that kind is
handed once, the filled template and a head spec (`LabelWords` or `Verbalizations`).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Union, cast, get_args

from raee.errors import TaskError
from raee.kinds import GENERATING_KINDS, KINDS, LM_KINDS, Kind

Metric = Literal["accuracy", "mcc"]  # Matthews correlation: CoLA's metric
METRICS: tuple[Metric, ...] = get_args(Metric)


@dataclass(frozen=True)
class LabelWords:
    """Head spec of the LM kinds: one word per label, read as the logit of its (first) space-prefixed token."""

    words: tuple[str, ...]


@dataclass(frozen=True)
class Verbalizations:
    """Head spec of the sentence-encoder kind: per label, sentences the input's pooled state is compared with."""

    groups: tuple[tuple[str, ...], ...]


HeadSpec = Union[LabelWords, Verbalizations]


@dataclass(frozen=True)
class Prompting:
    """A task as one backbone kind sees it: a template whose mask is filled in, and the head spec."""

    template: str  # holds {x}
    head: HeadSpec

    def prompts(self, texts: Sequence[str]) -> list[str]:
        return [self.template.replace("{x}", text) for text in texts]


@dataclass(frozen=True)
class TaskDefinition:
    """One classification task as the backbones see it."""

    name: str
    labels: tuple[str, ...]  # label names, in index order
    templates: Mapping[str, str]  # backbone kind -> template with {x} (and {mask} for masked-lm)
    label_words: Mapping[str, tuple[str, ...]]  # LM kind -> one word per label
    verbalizers: tuple[tuple[str, ...], ...]  # per label, sentences the sentence-encoder kind compares with
    metric: Metric = "accuracy"

    def __post_init__(self) -> None:
        if not self.name or not self.name.replace("-", "").replace("_", "").isalnum():
            raise TaskError(f"task name {self.name!r} must be letters, digits, '-' or '_'")
        if len(self.labels) < 2 or len(set(self.labels)) != len(self.labels):
            raise TaskError(f"task {self.name}: labels must be at least two distinct names, got {list(self.labels)}")
        if self.metric not in METRICS:
            raise TaskError(f"task {self.name}: metric {self.metric!r} is not one of {', '.join(METRICS)}")
        for kind, template in self.templates.items():
            _check_kind(self.name, kind)
            if "{x}" not in template:
                raise TaskError(f"task {self.name}: the {kind} template {template!r} has no {{x}} for the text")
            if kind == "masked-lm" and "{mask}" not in template:
                raise TaskError(f"task {self.name}: the masked-lm template {template!r} has no {{mask}}")
            if kind != "masked-lm" and "{mask}" in template:
                raise TaskError(f"task {self.name}: the {kind} template {template!r} holds {{mask}}, which only "
                                "masked-lm templates may")
        for kind, words in self.label_words.items():
            _check_kind(self.name, kind, LM_KINDS)
            if len(words) != len(self.labels):
                raise TaskError(
                    f"task {self.name}: {len(words)} {kind} label words for {len(self.labels)} labels")
            if any(not isinstance(w, str) or not w.strip() for w in words):
                raise TaskError(f"task {self.name}: {kind} label words must be non-empty strings, got {list(words)}")
        if self.verbalizers and len(self.verbalizers) != len(self.labels):
            raise TaskError(f"task {self.name}: {len(self.verbalizers)} verbalizer groups for "
                            f"{len(self.labels)} labels")
        if any(not group or not all(s.strip() for s in group) for group in self.verbalizers):
            raise TaskError(f"task {self.name}: every label needs at least one non-empty verbalization")

    @property
    def num_labels(self) -> int:
        return len(self.labels)

    def template_for(self, kind: Kind) -> str:
        """The prompt template for a backbone kind; the sentence-encoder kind defaults to the bare text."""
        if kind in self.templates:
            return self.templates[kind]
        if kind == "sentence-encoder":
            return "{x}"
        raise TaskError(f"task {self.name} has no template for {kind} backbones; add one to the task file")

    def head_spec(self, kind: Kind) -> HeadSpec:
        """Label words for the LM kinds, verbalizations for the sentence-encoder kind."""
        if kind == "sentence-encoder":
            if not self.verbalizers:
                raise TaskError(f"task {self.name} has no verbalizers, which sentence-encoder backbones need")
            return Verbalizations(self.verbalizers)
        if kind not in self.label_words:
            raise TaskError(f"task {self.name} has no label words for {kind} backbones; add them to the task file")
        return LabelWords(self.label_words[kind])

    def prompting(self, kind: Kind, mask_token: str | None = None) -> Prompting:
        """What a backbone of `kind` is given for this task. mask_token: the masked-LM tokenizer's mask token."""
        _check_kind(self.name, kind)
        template = self.template_for(kind)
        if "{mask}" in template:
            if not mask_token:
                raise TaskError(f"task {self.name}: the {kind} template needs a mask token; the tokenizer has none")
            template = template.replace("{mask}", mask_token)
        if kind in GENERATING_KINDS:
            template = template.rstrip()  # the label word brings its own leading space
        return Prompting(template, self.head_spec(kind))

    def label_index(self, value: Any) -> int:
        """Index of a label given by name or by 0-based index; raises TaskError for an unknown label."""
        if isinstance(value, bool):
            raise TaskError(f"label {value!r} is neither a label name nor an index")
        if isinstance(value, int):
            if 0 <= value < len(self.labels):
                return value
        elif isinstance(value, str):
            if value in self.labels:
                return self.labels.index(value)
            if value.strip().isdigit() and int(value) < len(self.labels):
                return int(value)
        raise TaskError(f"unknown label {value!r} for task {self.name}; expected one of {list(self.labels)} "
                        f"or an index 0..{len(self.labels) - 1}")

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "labels": list(self.labels), "metric": self.metric,
                "template": dict(self.templates),
                "label_words": {kind: list(words) for kind, words in self.label_words.items()},
                "verbalizers": [list(group) for group in self.verbalizers]}

    @classmethod
    def from_dict(cls, spec: Mapping[str, Any]) -> "TaskDefinition":
        """Build from the user-file format (see README). `template` may be one string or a mapping kind ->
        template; one string holding {mask} is the masked-lm template, one without it serves the generating kinds
        (causal-lm, encoder-decoder). One string holding {mask} after {x} serves the generating kinds too, cut
        before the mask ("{x} This is{mask}." -> "{x} This is": the next word is the label word), so that one task
        file works with every kind. `label_words` may be one list for every LM kind or a mapping kind -> list;
        `verbalizers` may be one sentence or a list of sentences per label."""
        unknown = set(spec) - {"name", "labels", "template", "label_words", "verbalizers", "metric"}
        if unknown:
            raise TaskError(f"unknown task field(s) {sorted(unknown)}; valid: name, labels, template, label_words, "
                            "verbalizers, metric")
        for required in ("name", "labels"):
            if required not in spec:
                raise TaskError(f"task definition lacks {required!r}")
        template = spec.get("template", {})
        if isinstance(template, str):
            templates: dict[str, str] = ({"masked-lm": template} if "{mask}" in template
                         else {kind: template for kind in GENERATING_KINDS})
            before_mask = template.partition("{mask}")[0]
            if "{mask}" in template and "{x}" in before_mask:
                templates.update({kind: before_mask for kind in GENERATING_KINDS})
        elif isinstance(template, Mapping):
            templates = {str(k): v for k, v in template.items()}
        else:
            raise TaskError("template must be a string or a mapping of backbone kind to string")
        if any(not isinstance(t, str) for t in templates.values()):
            raise TaskError("every template must be a string")
        words = spec.get("label_words", {})
        if isinstance(words, (list, tuple)):
            label_words: dict[str, tuple[str, ...]] = {str(kind): tuple(words) for kind in LM_KINDS}
        elif isinstance(words, Mapping):
            label_words = {str(k): tuple(v) for k, v in words.items()}
        else:
            raise TaskError("label_words must be a list or a mapping of backbone kind to list")
        verbalizers = tuple((g,) if isinstance(g, str) else tuple(g) for g in spec.get("verbalizers", ()))
        return cls(name=str(spec["name"]), labels=tuple(str(x) for x in spec["labels"]), templates=templates,
                   label_words=label_words, verbalizers=verbalizers,
                   metric=cast(Metric, str(spec.get("metric", "accuracy"))))  # checked in __post_init__


def _check_kind(task: str, kind: str, allowed: tuple[str, ...] = KINDS) -> None:
    if kind not in allowed:
        raise TaskError(f"task {task}: backbone kind {kind!r} is not one of {', '.join(allowed)}")


def _reference(name: str, labels: tuple[str, ...], *, mlm: str, mlm_words: tuple[str, ...], generate: str,
               generate_words: tuple[str, ...], verbalizers: tuple[tuple[str, ...], ...],
               metric: Metric = "accuracy") -> TaskDefinition:
    """A task with the reference code's prompts: `mlm` for masked LMs (RoBERTa scripts), `generate` for causal LMs
    and encoder-decoders (the Llama and T5 scripts use the same strings)."""
    return TaskDefinition(
        name=name, labels=labels, metric=metric,
        templates={"masked-lm": mlm, "causal-lm": generate, "encoder-decoder": generate},
        label_words={"masked-lm": mlm_words, "causal-lm": generate_words, "encoder-decoder": generate_words},
        verbalizers=verbalizers)


def _sentiment(name: str, labels: tuple[str, ...], mlm_words: tuple[str, ...],
               words: tuple[str, ...]) -> TaskDefinition:
    options = ", ".join(words[:-1]) + " or " + words[-1]
    return _reference(name, labels, mlm="{x} It was{mask}.", mlm_words=mlm_words,
                      generate=f"What is the sentiment of the sentence '{{x}}'? Print {options}. The answer is ",
                      generate_words=words, verbalizers=tuple((f"It was {w}.",) for w in mlm_words))


_BINARY = ("negative", "positive")
_TREC = ("Description", "Entity", "Expression", "Human", "Location", "Number")
BUILTIN_TASKS: dict[str, TaskDefinition] = {
    "sst2": _sentiment("sst2", _BINARY, ("terrible", "great"), _BINARY),
    "mr": _sentiment("mr", _BINARY, ("terrible", "great"), _BINARY),
    "cr": _sentiment("cr", _BINARY, ("terrible", "great"), _BINARY),
    "mpqa": _sentiment("mpqa", _BINARY, ("terrible", "great"), _BINARY),
    "sst5": _sentiment("sst5", ("very negative", "negative", "neutral", "positive", "very positive"),
                       ("terrible", "bad", "okay", "good", "great"), ("terrible", "bad", "okay", "good", "great")),
    "subj": _reference(
        "subj", ("subjective", "objective"), mlm="{x} This is{mask}.", mlm_words=("subjective", "objective"),
        generate="What is the subjectivity of the sentence '{x}'? Print subjective or objective. The answer is ",
        generate_words=("subjective", "objective"),
        verbalizers=(("This is subjective.",), ("This is objective.",))),
    "trec": _reference(
        "trec", ("description", "entity", "expression", "human", "location", "number"), mlm="{mask}:{x}",
        mlm_words=_TREC, generate="Print the category for the sentence '{x}': Description, Entity, Expression, "
                                  "Human, Location or Number. The answer is",
        generate_words=_TREC,
        verbalizers=(("This asks for a description.",), ("This asks for an entity.",),
                     ("This asks for an expression.",), ("This asks for a person.",),
                     ("This asks for a location.",), ("This asks for a number.",))),
    "cola": _reference(
        "cola", ("unacceptable", "acceptable"), metric="mcc", mlm="{x} This is{mask}.",
        mlm_words=("incorrect", "correct"),
        generate="Is the sentence '{x}' grammatically acceptable? Print no or yes. The answer is ",
        generate_words=("no", "yes"), verbalizers=(("This is incorrect.",), ("This is correct.",))),
}


def load_task(name_or_file: str | Path) -> TaskDefinition:
    """A built-in task by name, or a user task from a YAML or JSON file."""
    if str(name_or_file) in BUILTIN_TASKS:
        return BUILTIN_TASKS[str(name_or_file)]
    path = Path(name_or_file)
    if not path.is_file():
        raise TaskError(f"unknown task {str(name_or_file)!r}: not a built-in task ({', '.join(BUILTIN_TASKS)}) "
                        "and no such task file")
    text = path.read_text(encoding="utf-8")
    try:
        if path.suffix.lower() in (".yaml", ".yml"):
            import yaml
            spec = yaml.safe_load(text)
        else:
            spec = json.loads(text)
    except Exception as exc:  # yaml and json raise different types; both mean the same to the user
        raise TaskError(f"{path}: not valid {'YAML' if path.suffix.lower() in ('.yaml', '.yml') else 'JSON'}: {exc}")
    if not isinstance(spec, dict):
        raise TaskError(f"{path}: a task file holds one mapping with name, labels, template, ...")
    return TaskDefinition.from_dict(spec)
