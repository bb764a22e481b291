"""Gemma-2: layers alternate sliding-window and global attention (config.layer_types, one mask each); the
embeddings are scaled inside the model's forward (captured with the first layer's inputs); the LM head's logits
are soft-capped (final_logit_softcapping), which changes the label probabilities, not only their order."""

from raee.backbones.family import LayerTypedMasks, VocabularyHead, register


@register
class Gemma2(LayerTypedMasks):
    name = "gemma2"
    model_types = ("gemma2",)
    stack_paths = ("layers",)
    final_norm_paths = ("norm",)

    def lm_head(self) -> VocabularyHead:
        head = super().lm_head()
        return VocabularyHead(head.features, head.weight, head.bias,
                              softcap=getattr(self.config, "final_logit_softcapping", None))
