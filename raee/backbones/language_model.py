"""What the three LM kinds share: label words read as token ids through the model's own vocabulary head.

A label word is read as the logit of its first space-prefixed token, and only the label words' rows of the
vocabulary projection are multiplied (C rows instead of 50k-250k).
"""

from __future__ import annotations

import logging
from abc import abstractmethod
from dataclasses import dataclass
from typing import Any

import torch

from raee.backbones.base import Backbone
from raee.backbones.family import VocabularyHead
from raee.backbones.layerwise import LayerwiseForward, rows_of
from raee.errors import BackboneError, TaskError
from raee.tasks import HeadSpec, LabelWords

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LabelIds:
    """An LM kind's reading of LabelWords: the token id of each label word."""

    words: tuple[str, ...]
    ids: torch.Tensor  # (C,) int64


class LanguageModelBackbone(Backbone):
    """A backbone whose head is the model's vocabulary head, read at one position per row."""

    @abstractmethod
    def vocabulary_head(self, layer: int) -> VocabularyHead:
        """The head applied to a state after `layer` layers."""

    def answer_states(self, fwd: LayerwiseForward, rows: torch.Tensor) -> torch.Tensor:
        """(R, H) the state at each row's answer position."""
        if fwd.answer_positions is None:  # every language-model kind reads the state at one position
            raise BackboneError(f"this {self.kind} pass has no answer positions to read")
        hidden = rows_of(fwd.hidden, rows)  # (R, T, H)
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), rows_of(fwd.answer_positions, rows)]

    def make_head(self, spec: HeadSpec) -> LabelIds:
        if not isinstance(spec, LabelWords):
            raise TaskError(f"{self.kind} backbones read label words, not {type(spec).__name__}")
        return LabelIds(spec.words, label_token_ids(self.tokenizer, spec.words, self.device))

    @torch.inference_mode()
    def label_logits(self, fwd: LayerwiseForward, rows: torch.Tensor, head: LabelIds) -> torch.Tensor:
        return self.vocabulary_head(fwd.layer).logits(self.answer_states(fwd, rows), head.ids)

    @torch.inference_mode()
    def vocab_top2(self, fwd: LayerwiseForward) -> torch.Tensor:
        everyone = torch.ones(fwd.hidden.shape[0], dtype=torch.bool, device=fwd.hidden.device)
        logits = self.vocabulary_head(fwd.layer).logits(self.answer_states(fwd, everyone)).float()
        return torch.softmax(logits, dim=-1).topk(2, dim=-1).values  # (B, 2)


def label_token_ids(tokenizer: Any, words: tuple[str, ...], device: torch.device) -> torch.Tensor:
    """Token id of each label word read as a space-prefixed word; the first piece where it splits (logged).
    Refuses words the tokenizer cannot spell (they would read the unknown token's logit) and words sharing a first
    token (their scores would be equal)."""
    ids = []
    for word in words:
        pieces = tokenizer.encode(" " + word, add_special_tokens=False)
        if not pieces:
            raise BackboneError(f"label word {word!r} tokenizes to nothing")
        if tokenizer.unk_token_id is not None and pieces[0] == tokenizer.unk_token_id:
            raise BackboneError(f"label word {word!r} is unknown to this tokenizer (it reads as "
                                f"{tokenizer.unk_token!r}); choose a word in its vocabulary")
        if len(pieces) > 1:
            log.warning("label word %r is %d tokens; reading its first token only", word, len(pieces))
        ids.append(pieces[0])
    if len(set(ids)) != len(ids):
        raise BackboneError(f"label words {list(words)} share a first token; choose words that differ")
    return torch.tensor(ids, device=device)
