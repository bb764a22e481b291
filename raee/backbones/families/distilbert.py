"""DistilBERT: layers under `transformer.layer`; the MLM head is four modules beside the base model."""

import torch

from raee.backbones.family import Family, VocabularyHead, register


@register
class DistilBert(Family):
    name = "distilbert"
    model_types = ("distilbert",)
    stack_paths = ("transformer.layer",)
    final_norm_paths = ()

    def mlm_head(self) -> VocabularyHead:
        m = self.model

        def features(hidden: torch.Tensor) -> torch.Tensor:
            return m.vocab_layer_norm(m.activation(m.vocab_transform(hidden)))

        return VocabularyHead(features, m.vocab_projector.weight, m.vocab_projector.bias)
