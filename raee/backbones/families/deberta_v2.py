"""DeBERTa-v2/v3: relative embeddings and positions shared by every layer, and (with conv_kernel_size > 0) a
convolution applied after the first layer to its output and the embeddings: the generic path would drop it."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, cast

import torch
from torch import nn

from raee.backbones.family import Family, VocabularyHead, layer_output, register

if TYPE_CHECKING:
    from raee.backbones.layerwise import LayerwiseForward


@register
class DebertaV2(Family):
    name = "deberta-v2"
    model_types = ("deberta-v2",)
    stack_paths = ("encoder.layer",)
    final_norm_paths = ()
    shared_inputs = frozenset({"rel_embeddings", "relative_pos"})

    def begin(self, input_ids: torch.Tensor,
              attention_mask: torch.Tensor) -> tuple[torch.Tensor, dict[str, Any], dict[str, Any]]:
        hidden, inputs, _ = super().begin(input_ids, attention_mask)
        # what the conv after layer 1 reads: the embedding output and the plain (B, T) mask
        return hidden, inputs, {"embeddings": hidden, "input_mask": attention_mask}

    def run_layer(self, fwd: LayerwiseForward, index: int) -> torch.Tensor:
        out = layer_output(self.layers[index](fwd.hidden, **fwd.inputs))
        conv = self.base.encoder.conv
        if index == 0 and conv is not None:
            out = conv(fwd.carry["embeddings"], out, fwd.carry["input_mask"])
        return out

    def mlm_head(self) -> VocabularyHead:
        if getattr(self.model, "legacy", True):  # cls.predictions: transform, then a decoder Linear
            predictions = self.model.cls.predictions
            return VocabularyHead(predictions.transform, predictions.decoder.weight, predictions.decoder.bias)
        head = self.model.lm_predictions.lm_head  # dense, act, norm, then the word embeddings and a bias

        def features(hidden: torch.Tensor) -> torch.Tensor:
            return head.LayerNorm(head.transform_act_fn(head.dense(hidden)))

        embeddings = cast(nn.Embedding, self.base.embeddings.word_embeddings)
        return VocabularyHead(features, embeddings.weight, head.bias)
