"""XLM-RoBERTa: RoBERTa's architecture with a 250k-token vocabulary."""

from raee.backbones.family import Family, register


@register
class XLMRoberta(Family):
    name = "xlm-roberta"
    model_types = ("xlm-roberta",)
    stack_paths = ("encoder.layer",)
    final_norm_paths = ()
