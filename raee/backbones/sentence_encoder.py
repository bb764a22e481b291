"""Sentence-encoder zero-shot backbones (the embedded default, all-MiniLM-L6-v2).

Label i's score at layer l is scale * cosine(mean-pooled layer-l state of the input, mean-pooled layer-l state of
label i's verbalizations). sentence-transformers trains such encoders with a similarity scale of 20, the default.
Verbalization states are computed once per task and layer and cached.
"""

from __future__ import annotations

import torch
from torch import nn

from raee.backbones.base import Backbone, mean_pool
from raee.backbones.layerwise import LayerwiseForward
from raee.errors import InputError
from raee.tasks import TaskDefinition

DEFAULT_SCALE = 20.0


class SentenceEncoderBackbone(Backbone):
    kind = "sentence-encoder"

    def __init__(self, model: nn.Module, tokenizer, *, scale: float = DEFAULT_SCALE, **kwargs) -> None:
        super().__init__(model, tokenizer, **kwargs)
        if not scale > 0:
            raise InputError(f"scale must be positive, got {scale}")
        self.scale = float(scale)
        self._prototypes: dict[tuple, torch.Tensor] = {}

    def settings(self) -> dict:
        return {"scale": self.scale}

    @torch.inference_mode()
    def label_logits(self, fwd: LayerwiseForward, rows: torch.Tensor, task: TaskDefinition) -> torch.Tensor:
        pooled = mean_pool(fwd.hidden[rows], fwd.attention_mask[rows])  # (R, H)
        return self.scale * pooled @ self.prototypes(task)[fwd.layer].T  # (R, C)

    def prepare(self, task: TaskDefinition) -> None:
        self.prototypes(task)

    def prototypes(self, task: TaskDefinition) -> torch.Tensor:
        """(L+1, C, H): per layer, each label's normalised mean of its verbalizations' pooled states."""
        key = (task.name, task.verbalizers_or_fail())
        if key not in self._prototypes:
            groups = task.verbalizers_or_fail()
            sentences = [s for group in groups for s in group]
            plain = TaskDefinition(name="verbalizations", labels=("a", "b"), templates={}, label_words={},
                                   verbalizers=())
            pooled = self.pooled_every_layer(sentences, plain)  # (S, L+1, H)
            per_label, start = [], 0
            for group in groups:
                per_label.append(pooled[start:start + len(group)].mean(dim=0))  # (L+1, H)
                start += len(group)
            self._prototypes[key] = torch.nn.functional.normalize(torch.stack(per_label, dim=1), dim=-1).to(
                self.device)
        return self._prototypes[key]
