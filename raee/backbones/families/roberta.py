"""RoBERTa: BERT's layers; its MLM head (dense, gelu, norm, decoder) is the generic one."""

from raee.backbones.family import ExportableEncoder, register


@register
class Roberta(ExportableEncoder):
    name = "roberta"
    model_types = ("roberta",)
    stack_paths = ("encoder.layer",)
