"""DistilBERT: layers under `transformer.layer`; the MLM head is four modules beside the base model."""

import torch

from raee.backbones.family import ExportableEncoder, VocabularyHead, register


@register
class DistilBert(ExportableEncoder):
    name = "distilbert"
    model_types = ("distilbert",)
    stack_paths = ("transformer.layer",)

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.base.embeddings(input_ids)

    def mlm_head(self) -> VocabularyHead:
        m = self.model

        def features(hidden: torch.Tensor) -> torch.Tensor:
            return m.vocab_layer_norm(m.activation(m.vocab_transform(hidden)))

        return VocabularyHead(features, m.vocab_projector.weight, m.vocab_projector.bias)
