"""Encoder-decoder backbones (T5), as in the RAEE reference: candidate exits 0..L_enc read the encoder's state at
the last prompt token through the encoder's final norm and the LM head; exits L_enc+1..L_enc+L_dec read the
decoder's state at the first decoding step through the decoder's final norm and the LM head. An encoder exit runs
no decoder layer; a decoder exit runs the whole encoder and (l - L_enc) decoder layers. Full depth is the last
decoder layer: the model's own first-step prediction.

Prompts are tokenized without special tokens, as the reference does, so the last real token is the prompt's own.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from raee.backbones.families.t5 import T5
from raee.backbones.family import VocabularyHead
from raee.backbones.language_model import LanguageModelBackbone
from raee.backbones.layerwise import LayerwiseForward
from raee.errors import BackboneError


class EncoderDecoderBackbone(LanguageModelBackbone):
    kind = "encoder-decoder"
    add_special_tokens = False

    def __init__(self, model: nn.Module, tokenizer: Any, **kwargs: Any) -> None:
        self._heads_by_stage: tuple[VocabularyHead, VocabularyHead] | None = None
        super().__init__(model, tokenizer, **kwargs)
        _ = self.stages  # a family without an encoder-decoder adapter is refused now, not at first use

    @property
    def stages(self) -> T5:
        """The family adapter, which runs the encoder's layers and then the decoder's (T5, the one such family)."""
        if not isinstance(self.family, T5):
            raise BackboneError(f"{self.source}: the {self.family.name} family has no encoder-decoder adapter")
        return self.family

    @property
    def num_encoder_layers(self) -> int:
        return self.stages.num_encoder_layers

    @property
    def max_prefix_layer(self) -> int:
        return self.num_encoder_layers  # decoder states hold one position, not the prompt's tokens

    def vocabulary_head(self, layer: int) -> VocabularyHead:
        if self._heads_by_stage is None:
            self._heads_by_stage = self.stages.stage_heads()
        return self._heads_by_stage[0 if layer <= self.num_encoder_layers else 1]

    def answer_states(self, fwd: LayerwiseForward, rows: torch.Tensor) -> torch.Tensor:
        if fwd.layer <= self.num_encoder_layers:
            return super().answer_states(fwd, rows)
        return fwd.hidden[rows][:, 0]  # the decoder's first (and only) step
