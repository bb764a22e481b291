"""Llama: rotary position embeddings and one causal mask, computed once by the model and shared by every layer."""

from raee.backbones.family import Family, register


@register
class Llama(Family):
    name = "llama"
    model_types = ("llama",)
    stack_paths = ("layers",)
    final_norm_paths = ("norm",)
