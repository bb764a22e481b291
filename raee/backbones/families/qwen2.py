"""Qwen2: Llama's layout, but with use_sliding_window some layers (config.layer_types) attend through a sliding
window, so each layer gets its own type's mask."""

from raee.backbones.family import LayerTypedMasks, register


@register
class Qwen2(LayerTypedMasks):
    name = "qwen2"
    model_types = ("qwen2",)
    stack_paths = ("layers",)
    final_norm_paths = ("norm",)
