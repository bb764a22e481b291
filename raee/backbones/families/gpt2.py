"""GPT-2: blocks under `h`, final norm `ln_f`, tied LM head."""

from raee.backbones.family import Family, register


@register
class GPT2(Family):
    name = "gpt2"
    model_types = ("gpt2",)
    stack_paths = ("h",)
    final_norm_paths = ("ln_f",)
