"""Exit records: per calibration item, the gold label and the label logits at every layer 0..L.

RAEE's record V(x) = [(l, p_l) for every l where the layer-l prediction is right] follows from these, and so does
every other policy's input (the accuracy rule's right/wrong records, calibrated confidence, the oracle). For
language-model backbones the records may also hold `vocab_top2`: the top-1 and top-2 probabilities of the full
next-token (vocabulary) softmax at every layer, which AdaInfer's features read.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from raee.errors import StoreError

if TYPE_CHECKING:
    from raee.accuracy_rule import RecordValues


@dataclass(frozen=True)
class ExitRecords:
    gold: np.ndarray  # (N,) int64 label index
    label_logits: np.ndarray  # (N, L+1, C) float32, layer 0 = embedding output
    vocab_top2: np.ndarray | None = None  # (N, L+1, 2) full-vocabulary top-1, top-2 probability; LM backbones only

    def __post_init__(self) -> None:
        if self.label_logits.ndim != 3 or self.gold.ndim != 1 or len(self.gold) != len(self.label_logits):
            raise StoreError(f"exit records have mismatched shapes: gold {self.gold.shape}, "
                             f"label_logits {self.label_logits.shape}")
        if len(self.gold) and (self.gold.min() < 0 or self.gold.max() >= self.label_logits.shape[2]):
            raise StoreError("exit records hold gold labels outside the task's labels")
        if self.vocab_top2 is not None and self.vocab_top2.shape != (*self.label_logits.shape[:2], 2):
            raise StoreError(f"exit records' vocab_top2 is {self.vocab_top2.shape}, expected "
                             f"{(*self.label_logits.shape[:2], 2)}")

    @property
    def num_items(self) -> int:
        return len(self.gold)

    @property
    def num_layers(self) -> int:
        return self.label_logits.shape[1] - 1

    @property
    def probabilities(self) -> np.ndarray:
        """(N, L+1, C) softmax over the label words."""
        return softmax(self.label_logits)

    @property
    def predicted(self) -> np.ndarray:
        """(N, L+1) predicted label per layer."""
        return self.label_logits.argmax(axis=-1)

    @property
    def gold_one_hot(self) -> np.ndarray:
        """(N, C) float64: 1 at each item's gold label (what the accuracy rule's votes count)."""
        return np.eye(self.label_logits.shape[2])[self.gold]

    @property
    def correct(self) -> np.ndarray:
        """(N, L+1) bool: the layer's prediction is the gold label."""
        return self.predicted == self.gold[:, None]

    def record_probability(self) -> np.ndarray:
        """(N, L+1): p_l where layer l is right, else 0 -- RAEE's exit records as a dense matrix."""
        return np.where(self.correct, self.probabilities.max(axis=-1), 0.0).astype(np.float32)

    def record_values(self, values: RecordValues) -> np.ndarray:
        """(N, L+1) float32 records the accuracy rule averages: "correct" (1/0) or "confidence" (p_l where right)."""
        if values == "correct":
            return self.correct.astype(np.float32)
        if values == "confidence":
            return self.record_probability()
        raise StoreError(f"record values {values!r} are not 'correct' or 'confidence'")

    def earliest_correct(self) -> np.ndarray:
        """(N,) earliest correct layer, -1 where no layer is right."""
        return earliest_correct_layers(self.label_logits, self.gold, missing=-1)

    def layer_accuracy(self) -> np.ndarray:
        """(L+1,) share of items each layer answers correctly."""
        return self.correct.mean(axis=0)

    @staticmethod
    def concatenate(parts: list["ExitRecords"]) -> "ExitRecords":
        vocab = [p.vocab_top2 for p in parts]
        if any(v is None for v in vocab) and not all(v is None for v in vocab):
            raise StoreError("cannot join exit records with and without vocabulary probabilities")
        return ExitRecords(np.concatenate([p.gold for p in parts]), np.concatenate([p.label_logits for p in parts]),
                           None if vocab[0] is None else np.concatenate([v for v in vocab if v is not None]))


def layers_run(exits: np.ndarray | int, key_layer: int) -> np.ndarray:
    """Layers computed by a text that exits at `exits` ((Q,) or one layer): a prefix key has already run the first
    K, so max(exit, K); an embedder key or a fixed exit passes key_layer 0."""
    return np.maximum(exits, key_layer)


def predictions_at(label_logits: np.ndarray, exits: np.ndarray) -> np.ndarray:
    """(Q,) the label each row predicts at its own exit layer, from label_logits (Q, L+1, C) and exits (Q,)."""
    return label_logits[np.arange(len(exits)), exits].argmax(axis=-1)


def earliest_correct_layers(label_logits: np.ndarray, gold: np.ndarray, missing: int) -> np.ndarray:
    """(N,) the earliest layer whose prediction is the gold label -- the oracle's exit; `missing` where none is."""
    correct = label_logits.argmax(axis=-1) == gold[:, None]
    return np.where(correct.any(axis=1), correct.argmax(axis=1), missing)


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=-1, keepdims=True)
    e = np.exp(shifted)
    return e / e.sum(axis=-1, keepdims=True)
