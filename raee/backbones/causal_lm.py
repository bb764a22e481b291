"""Causal-LM backbones (Llama/GPT-2/OPT/Qwen family): final norm + LM head at the last token ("logit lens")."""

from __future__ import annotations

import torch
from torch import nn

from raee.backbones.base import Backbone
from raee.backbones.layerwise import LayerwiseForward
from raee.backbones.masked_lm import LabelWords
from raee.errors import BackboneError
from raee.tasks import TaskDefinition

FINAL_NORM_NAMES = ("norm", "ln_f", "final_layer_norm", "final_norm", "decoder.final_layer_norm")


class CausalLMBackbone(LabelWords, Backbone):
    kind = "causal-lm"

    def __init__(self, model: nn.Module, tokenizer, **kwargs) -> None:
        super().__init__(model, tokenizer, **kwargs)
        self.final_norm = _final_norm(self.base)
        self.lm_head = model.get_output_embeddings()
        if self.lm_head is None:
            raise BackboneError(f"{type(model).__name__} has no LM head")
        self._label_ids: dict[tuple, torch.Tensor] = {}

    def prompt(self, text: str, task: TaskDefinition) -> str:
        # The label word carries its own leading space, so the prompt must not end with one.
        return super().prompt(text, task).rstrip()

    @torch.inference_mode()
    def label_logits(self, fwd: LayerwiseForward, rows: torch.Tensor, task: TaskDefinition) -> torch.Tensor:
        hidden = fwd.hidden[rows]  # (R, T, H)
        last = hidden[torch.arange(hidden.shape[0], device=hidden.device), fwd.answer_positions[rows]]  # (R, H)
        ids = self.label_ids(task)
        if not isinstance(self.lm_head, nn.Linear):
            return self.lm_head(self.final_norm(last))[:, ids]
        # Only the label words' rows of the LM head: C rows instead of the whole vocabulary.
        bias = self.lm_head.bias
        return torch.nn.functional.linear(self.final_norm(last), self.lm_head.weight[ids],
                                          bias[ids] if bias is not None else None)


def _final_norm(base: nn.Module) -> nn.Module:
    for path in FINAL_NORM_NAMES:
        module = base
        for part in path.split("."):
            module = getattr(module, part, None)
        if isinstance(module, nn.Module):
            return module
    raise BackboneError(f"cannot find the final norm of {type(base).__name__}; looked for {FINAL_NORM_NAMES}")
