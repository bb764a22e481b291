"""Mistral: Llama's layout; with a sliding window, the model makes one sliding-window mask for every layer."""

from raee.backbones.family import Family, register


@register
class Mistral(Family):
    name = "mistral"
    model_types = ("mistral",)
    stack_paths = ("layers",)
    final_norm_paths = ("norm",)
