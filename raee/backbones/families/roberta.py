"""RoBERTa: BERT's layers; its MLM head (dense, gelu, norm, decoder) is the generic one."""

from raee.backbones.family import Family, register


@register
class Roberta(Family):
    name = "roberta"
    model_types = ("roberta",)
    stack_paths = ("encoder.layer",)
    final_norm_paths = ()
