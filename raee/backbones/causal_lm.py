"""Causal-LM backbones (GPT-2, Llama, Mistral, Qwen2, OPT, Gemma-2): the family's final norm and LM head at the
last token ("logit lens")."""

from __future__ import annotations

from typing import Any

from torch import nn

from raee.backbones.family import VocabularyHead
from raee.backbones.language_model import LanguageModelBackbone


class CausalLMBackbone(LanguageModelBackbone):
    kind = "causal-lm"

    def __init__(self, model: nn.Module, tokenizer: Any, **kwargs: Any) -> None:
        self._head: VocabularyHead | None = None
        super().__init__(model, tokenizer, **kwargs)

    def vocabulary_head(self, layer: int) -> VocabularyHead:
        if self._head is None:
            self._head = self.family.lm_head()
        return self._head
