"""Sentence-encoder zero-shot backbones (the embedded default, all-MiniLM-L6-v2).

Label i's score at layer l is scale * cosine(pooled layer-l state of the input, pooled layer-l state of label i's
verbalizations), pooled the way the checkpoint pools (its sentence-transformers Pooling config: mean, CLS, ...).
sentence-transformers trains such encoders with a similarity scale of 20, the default. Verbalization states are
computed once per head spec and layer and cached.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from raee.backbones.base import Backbone
from raee.backbones.layerwise import LayerwiseForward, rows_of
from raee.backbones.pooling import Pooling
from raee.errors import InputError, TaskError
from raee.kinds import DEFAULT_SCALE
from raee.tasks import HeadSpec, Verbalizations


@dataclass(frozen=True)
class Prototypes:
    """The sentence-encoder kind's reading of Verbalizations: per layer, each label's normalised mean of its
    verbalizations' pooled states."""

    vectors: torch.Tensor  # (L+1, C, D)


class SentenceEncoderBackbone(Backbone):
    kind = "sentence-encoder"

    def __init__(self, model: nn.Module, tokenizer: Any, *, scale: float = DEFAULT_SCALE,
                 pooling: Pooling = Pooling(), **kwargs: Any) -> None:
        if not scale > 0:
            raise InputError(f"scale must be positive, got {scale}")
        self.scale = float(scale)
        self.pooling = pooling
        super().__init__(model, tokenizer, **kwargs)

    def settings(self) -> dict[str, Any]:
        return {"scale": self.scale}

    def identity(self) -> dict[str, Any]:
        return {**super().identity(), "pooling": str(self.pooling)}

    def answer_positions(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> None:
        return None  # the whole prompt is pooled

    def pooled(self, fwd: LayerwiseForward, rows: torch.Tensor) -> torch.Tensor:
        """(R, D) normalised pooled states of the rows at fwd.layer."""
        pooled = self.pooling(rows_of(fwd.hidden, rows), rows_of(fwd.attention_mask, rows))
        return nn.functional.normalize(pooled.float(), dim=-1)

    @torch.inference_mode()
    def label_logits(self, fwd: LayerwiseForward, rows: torch.Tensor, head: Prototypes) -> torch.Tensor:
        return self.scale * self.pooled(fwd, rows) @ head.vectors[fwd.layer].T  # (R, C)

    @torch.inference_mode()
    def make_head(self, spec: HeadSpec) -> Prototypes:
        if not isinstance(spec, Verbalizations):
            raise TaskError(f"sentence-encoder backbones compare with verbalizations, not {type(spec).__name__}")
        sentences = [s for group in spec.groups for s in group]
        fwd = self.start(sentences)
        everyone = torch.ones(len(sentences), dtype=torch.bool, device=self.device)
        states = [self.pooled(fwd, everyone)]
        while fwd.layer < self.num_layers:
            fwd.advance()
            states.append(self.pooled(fwd, everyone))
        pooled = torch.stack(states, dim=1)  # (S, L+1, D)
        per_label, start = [], 0
        for group in spec.groups:
            per_label.append(pooled[start:start + len(group)].mean(dim=0))  # (L+1, D)
            start += len(group)
        return Prototypes(nn.functional.normalize(torch.stack(per_label, dim=1), dim=-1))
