"""Task definitions: labels, prompt templates and label words per backbone kind, and the metric.

The eight built-in tasks follow the RAEE reference prompts (../shared/RAEE.md). A template holds `{x}` for the
input text and, for masked LMs, `{mask}` for the mask token. Label words are read as single space-prefixed tokens.
The sentence-encoder kind compares the input with one or more verbalizations per label instead of label words.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from raee.errors import TaskError

BACKBONE_KINDS = ("masked-lm", "causal-lm", "sentence-encoder")
METRICS = ("accuracy", "mcc")


@dataclass(frozen=True)
class TaskDefinition:
    """One classification task as the backbones see it."""

    name: str
    labels: tuple[str, ...]  # label names, in index order
    templates: Mapping[str, str]  # backbone kind -> template with {x} (and {mask} for masked-lm)
    label_words: Mapping[str, tuple[str, ...]]  # backbone kind -> one word per label
    verbalizers: tuple[tuple[str, ...], ...]  # per label, sentences the sentence-encoder kind compares with
    metric: str = "accuracy"  # "accuracy" or "mcc" (Matthews correlation)

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
        for kind, words in self.label_words.items():
            _check_kind(self.name, kind)
            if len(words) != len(self.labels):
                raise TaskError(
                    f"task {self.name}: {len(words)} {kind} label words for {len(self.labels)} labels")
        if self.verbalizers and len(self.verbalizers) != len(self.labels):
            raise TaskError(f"task {self.name}: {len(self.verbalizers)} verbalizer groups for {len(self.labels)} labels")
        if any(not group or not all(s.strip() for s in group) for group in self.verbalizers):
            raise TaskError(f"task {self.name}: every label needs at least one non-empty verbalization")

    @property
    def num_labels(self) -> int:
        return len(self.labels)

    def template_for(self, kind: str) -> str:
        """The prompt template for a backbone kind; the sentence-encoder kind defaults to the bare text."""
        if kind in self.templates:
            return self.templates[kind]
        if kind == "sentence-encoder":
            return "{x}"
        raise TaskError(f"task {self.name} has no template for {kind} backbones; add one to the task file")

    def label_words_for(self, kind: str) -> tuple[str, ...]:
        if kind not in self.label_words:
            raise TaskError(f"task {self.name} has no label words for {kind} backbones; add them to the task file")
        return self.label_words[kind]

    def verbalizers_or_fail(self) -> tuple[tuple[str, ...], ...]:
        if not self.verbalizers:
            raise TaskError(f"task {self.name} has no verbalizers, which sentence-encoder backbones need")
        return self.verbalizers

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
        """Build from the user-file format (see README): `template` and `label_words` may be given once for every
        kind or per kind; `verbalizers` may be one sentence or a list of sentences per label."""
        unknown = set(spec) - {"name", "labels", "template", "label_words", "verbalizers", "metric"}
        if unknown:
            raise TaskError(f"unknown task field(s) {sorted(unknown)}; valid: name, labels, template, label_words, "
                            "verbalizers, metric")
        for required in ("name", "labels"):
            if required not in spec:
                raise TaskError(f"task definition lacks {required!r}")
        template = spec.get("template", {})
        templates = ({kind: template for kind in ("masked-lm", "causal-lm")}
                     if isinstance(template, str) else dict(template))
        if isinstance(template, str) and "{mask}" not in template:
            templates.pop("masked-lm")
        words = spec.get("label_words", {})
        label_words = ({kind: tuple(words) for kind in ("masked-lm", "causal-lm")}
                       if isinstance(words, (list, tuple)) else {k: tuple(v) for k, v in dict(words).items()})
        verbalizers = tuple((g,) if isinstance(g, str) else tuple(g) for g in spec.get("verbalizers", ()))
        return cls(name=str(spec["name"]), labels=tuple(str(x) for x in spec["labels"]), templates=templates,
                   label_words=label_words, verbalizers=verbalizers, metric=str(spec.get("metric", "accuracy")))


def _check_kind(task: str, kind: str) -> None:
    if kind not in BACKBONE_KINDS:
        raise TaskError(f"task {task}: backbone kind {kind!r} is not one of {', '.join(BACKBONE_KINDS)}")


def _sentiment(name: str, labels: tuple[str, ...], words: tuple[str, ...], options: str) -> TaskDefinition:
    return TaskDefinition(
        name=name, labels=labels,
        templates={"masked-lm": "{x} It was{mask}.",
                   "causal-lm": f"What is the sentiment of the sentence '{{x}}'? Print {options}. The answer is"},
        label_words={"masked-lm": words, "causal-lm": tuple(options.replace(" or ", ", ").split(", "))},
        verbalizers=tuple((f"It was {w}.",) for w in words))


_BINARY = ("negative", "positive")
BUILTIN_TASKS: dict[str, TaskDefinition] = {
    "sst2": _sentiment("sst2", _BINARY, ("terrible", "great"), "negative or positive"),
    "mr": _sentiment("mr", _BINARY, ("terrible", "great"), "negative or positive"),
    "cr": _sentiment("cr", _BINARY, ("terrible", "great"), "negative or positive"),
    "mpqa": _sentiment("mpqa", _BINARY, ("terrible", "great"), "negative or positive"),
    "sst5": _sentiment("sst5", ("very negative", "negative", "neutral", "positive", "very positive"),
                       ("terrible", "bad", "okay", "good", "great"), "terrible, bad, okay, good or great"),
    "subj": TaskDefinition(
        name="subj", labels=("subjective", "objective"),
        templates={"masked-lm": "{x} This is{mask}.",
                   "causal-lm": "Is the sentence '{x}' subjective or objective? The answer is"},
        label_words={"masked-lm": ("subjective", "objective"), "causal-lm": ("subjective", "objective")},
        verbalizers=(("This is subjective.",), ("This is objective.",))),
    "trec": TaskDefinition(
        name="trec", labels=("description", "entity", "expression", "human", "location", "number"),
        templates={"masked-lm": "{mask}:{x}",
                   "causal-lm": "What kind of answer does the question '{x}' ask for: description, entity, "
                                "expression, human, location or number? The answer is"},
        label_words={"masked-lm": ("Description", "Entity", "Expression", "Human", "Location", "Number"),
                     "causal-lm": ("description", "entity", "expression", "human", "location", "number")},
        verbalizers=(("This asks for a description.",), ("This asks for an entity.",),
                     ("This asks for an expression.",), ("This asks for a person.",),
                     ("This asks for a location.",), ("This asks for a number.",))),
    "cola": TaskDefinition(
        name="cola", labels=("unacceptable", "acceptable"), metric="mcc",
        templates={"masked-lm": "{x} This is{mask}.",
                   "causal-lm": "Is the sentence '{x}' grammatically correct or incorrect? The answer is"},
        label_words={"masked-lm": ("incorrect", "correct"), "causal-lm": ("incorrect", "correct")},
        verbalizers=(("This is incorrect.",), ("This is correct.",))),
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
