"""ELECTRA (its generator, the masked LM): embeddings narrower than the layers, projected up before the first; the
head is two modules beside the base model."""

import torch

from raee.backbones.family import ExportableEncoder, VocabularyHead, register


@register
class Electra(ExportableEncoder):
    name = "electra"
    model_types = ("electra",)
    stack_paths = ("encoder.layer",)

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        hidden = self.base.embeddings(input_ids=input_ids)
        project = getattr(self.base, "embeddings_project", None)
        return project(hidden) if project is not None else hidden

    def mlm_head(self) -> VocabularyHead:
        projection = self.model.generator_lm_head
        return VocabularyHead(self.model.generator_predictions, projection.weight, projection.bias)
