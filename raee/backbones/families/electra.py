"""ELECTRA (its generator, the masked LM): the head is two modules beside the base model."""

from raee.backbones.family import Family, VocabularyHead, register


@register
class Electra(Family):
    name = "electra"
    model_types = ("electra",)
    stack_paths = ("encoder.layer",)
    final_norm_paths = ()

    def mlm_head(self) -> VocabularyHead:
        projection = self.model.generator_lm_head
        return VocabularyHead(self.model.generator_predictions, projection.weight, projection.bias)
