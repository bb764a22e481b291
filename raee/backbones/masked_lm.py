"""Masked-LM backbones (BERT, RoBERTa, XLM-R, DistilBERT, DeBERTa-v2, ELECTRA): the MLM head read at the mask
token, over the label words."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from raee.backbones.family import VocabularyHead
from raee.backbones.language_model import LanguageModelBackbone
from raee.errors import BackboneError, InputError


class MaskedLMBackbone(LanguageModelBackbone):
    kind = "masked-lm"

    def __init__(self, model: nn.Module, tokenizer: Any, **kwargs: Any) -> None:
        if tokenizer.mask_token is None:
            raise BackboneError(f"{kwargs.get('source')}: the tokenizer has no mask token, so it cannot be a "
                                "masked-LM backbone")
        self._head: VocabularyHead | None = None
        super().__init__(model, tokenizer, **kwargs)

    @property
    def mask_token(self) -> str:
        return self.tokenizer.mask_token

    def vocabulary_head(self, layer: int) -> VocabularyHead:
        if self._head is None:
            self._head = self.family.mlm_head()
        return self._head

    def check_mask_count(self, index: int, masks: int) -> None:
        """The one rule on masks: a prompt holds exactly one mask token, the position the head reads."""
        if masks != 1:
            raise InputError(f"text {index} holds {masks} mask tokens after prompting; it must hold one (remove "
                             f"{self.tokenizer.mask_token!r} from the text)")

    def _check_prompt_ids(self, index: int, ids: list[int]) -> None:
        self.check_mask_count(index, ids.count(self.tokenizer.mask_token_id))

    def answer_positions(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        is_mask = input_ids == self.tokenizer.mask_token_id
        for row, masks in enumerate(is_mask.sum(dim=1).tolist()):
            self.check_mask_count(row, masks)
        return is_mask.int().argmax(dim=1)
