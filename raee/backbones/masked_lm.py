"""Masked-LM backbones (BERT/RoBERTa family): the MLM head read at the mask token, over the label words."""

from __future__ import annotations

import logging

import torch
from torch import nn

from raee.backbones.base import Backbone
from raee.backbones.layerwise import LayerwiseForward, capture_inputs
from raee.errors import BackboneError, InputError
from raee.tasks import TaskDefinition

log = logging.getLogger(__name__)


class LabelWords:
    """Mixin for kinds whose head scores label words: caches each task's label token ids."""

    _label_ids: dict[tuple, torch.Tensor]

    def prepare(self, task: TaskDefinition) -> None:
        self.label_ids(task)

    def label_ids(self, task: TaskDefinition) -> torch.Tensor:
        key = (task.name, task.label_words_for(self.kind))  # a reloaded store may bring other label words
        if key not in self._label_ids:
            self._label_ids[key] = label_token_ids(self.tokenizer, key[1], self.device)
        return self._label_ids[key]


class MaskedLMBackbone(LabelWords, Backbone):
    kind = "masked-lm"

    def __init__(self, model: nn.Module, tokenizer, **kwargs) -> None:
        super().__init__(model, tokenizer, **kwargs)
        if tokenizer.mask_token is None:
            raise BackboneError(f"{self.source}: the tokenizer has no mask token, so it cannot be a masked-LM backbone")
        self.head = _mlm_head(model, self.base)
        self.vocab_projection = _vocab_projection(self.head, model.config.vocab_size)
        self._label_ids: dict[tuple, torch.Tensor] = {}

    def _check_prompt_ids(self, index: int, ids: list[int]) -> None:
        masks = ids.count(self.tokenizer.mask_token_id)
        if masks != 1:
            raise InputError(f"text {index} holds {masks} mask tokens after prompting; it must hold one (remove "
                             f"{self.tokenizer.mask_token!r} from the text)")

    def answer_positions(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        is_mask = input_ids == self.tokenizer.mask_token_id
        counts = is_mask.sum(dim=1)
        if bool((counts != 1).any()):
            row = int((counts != 1).nonzero()[0])
            raise InputError(f"text {row} holds {int(counts[row])} mask tokens after prompting; it must hold one")
        return is_mask.int().argmax(dim=1)

    @torch.inference_mode()
    def label_logits(self, fwd: LayerwiseForward, rows: torch.Tensor, task: TaskDefinition) -> torch.Tensor:
        hidden = fwd.hidden[rows]  # (R, T, H)
        at_mask = hidden[torch.arange(hidden.shape[0], device=hidden.device), fwd.answer_positions[rows]]  # (R, H)
        return self._label_head(at_mask, self.label_ids(task))

    def _label_head(self, hidden: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """The MLM head's logits of the label words only, (R, H) -> (R, C): the head runs up to its vocabulary
        projection, which then uses just the label words' rows (50k -> C rows for RoBERTa)."""
        if self.vocab_projection is None:
            return self.head(hidden)[:, ids]
        args, kwargs = capture_inputs(self.vocab_projection, lambda: self.head(hidden))
        features = args[0] if args else kwargs["input"]
        bias = self.vocab_projection.bias
        return torch.nn.functional.linear(features, self.vocab_projection.weight[ids],
                                          bias[ids] if bias is not None else None)


def label_token_ids(tokenizer, words: tuple[str, ...], device: torch.device) -> torch.Tensor:
    """Token id of each label word read as a space-prefixed word; the first piece where it splits (logged)."""
    ids = []
    for word in words:
        pieces = tokenizer.encode(" " + word, add_special_tokens=False)  # before serving starts: no lock needed
        if not pieces:
            raise BackboneError(f"label word {word!r} tokenizes to nothing")
        if len(pieces) > 1:
            log.warning("label word %r is %d tokens; reading its first token only", word, len(pieces))
        ids.append(pieces[0])
    if len(set(ids)) != len(ids):
        raise BackboneError(f"label words {list(words)} share a first token; choose words that differ")
    return torch.tensor(ids, device=device)


def _vocab_projection(head: nn.Module, vocab_size: int) -> nn.Linear | None:
    """The head's final Linear onto the vocabulary, if it has exactly one."""
    found = [m for m in head.modules() if isinstance(m, nn.Linear) and m.out_features == vocab_size]
    return found[0] if len(found) == 1 else None


def _mlm_head(model: nn.Module, base: nn.Module) -> nn.Module:
    """The module mapping a hidden state to vocabulary logits: the model's one child beside its base model."""
    heads = [m for name, m in model.named_children() if m is not base and any(True for _ in m.parameters())]
    if len(heads) != 1:
        raise BackboneError(f"cannot tell the MLM head of {type(model).__name__}: children "
                            f"{[n for n, _ in model.named_children()]}")
    return heads[0]
