"""Labelled examples from JSONL, CSV or TSV files. Errors name the file and line."""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from raee.errors import DataError, TaskError
from raee.tasks import TaskDefinition


@dataclass(frozen=True)
class Example:
    text: str
    label: int  # index into TaskDefinition.labels
    line: int  # 1-based line number in the source file (data rows of CSV/TSV count from 2)


def read_examples(path: str | Path, task: TaskDefinition, *, text_column: str = "text",
                  label_column: str = "label", limit: int | None = None) -> list[Example]:
    """Read `{"text": ..., "label": ...}` JSONL, or CSV/TSV with named columns; labels by name or 0-based index."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    rows = _jsonl_rows(path) if path.suffix.lower() in (".jsonl", ".json") else _table_rows(path)
    examples: list[Example] = []
    for line, row in rows:
        if limit is not None and len(examples) >= limit:
            break
        if text_column not in row or label_column not in row:
            raise DataError(f"{path}:{line}: needs fields {text_column!r} and {label_column!r}, has {sorted(row)}")
        text = row[text_column]
        if not isinstance(text, str) or not text.strip():
            raise DataError(f"{path}:{line}: empty text")
        try:
            label = task.label_index(row[label_column])
        except TaskError as exc:
            raise DataError(f"{path}:{line}: {exc}") from None
        examples.append(Example(text=text, label=label, line=line))
    if not examples:
        raise DataError(f"{path}: no examples")
    return examples


def _jsonl_rows(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    with path.open(encoding="utf-8-sig") as f:  # -sig: a byte-order mark (Excel, Notepad) is read and dropped
        for line, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            try:
                row = json.loads(raw)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}:{line}: not valid JSON: {exc.msg}") from None
            if not isinstance(row, dict):
                raise DataError(f"{path}:{line}: expected an object like {{\"text\": ..., \"label\": ...}}")
            yield line, row


def _table_rows(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    delimiter = "\t" if path.suffix.lower() == ".tsv" else ","
    with path.open(encoding="utf-8-sig", newline="") as f:  # else a BOM becomes part of the first column's name
        for line, row in enumerate(csv.DictReader(f, delimiter=delimiter), start=2):
            yield line, row


def text_groups(texts: list[str]) -> np.ndarray:
    """(N,) group id per text: texts equal after stripping whitespace share one (the first one's index)."""
    first: dict[str, int] = {}
    return np.array([first.setdefault(t.strip(), i) for i, t in enumerate(texts)], dtype=np.int64)


def seen_texts(texts: list[str], known: list[str]) -> np.ndarray:
    """(len(texts),) bool: the text appears verbatim (after stripping whitespace) among `known`."""
    known_set = {t.strip() for t in known}
    return np.array([t.strip() in known_set for t in texts], dtype=bool)
