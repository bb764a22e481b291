"""XLM-RoBERTa: RoBERTa's architecture with a 250k-token vocabulary."""

from raee.backbones.family import ExportableEncoder, register


@register
class XLMRoberta(ExportableEncoder):
    name = "xlm-roberta"
    model_types = ("xlm-roberta",)
    stack_paths = ("encoder.layer",)
