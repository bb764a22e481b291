"""BERT (masked LM, and the bert-style sentence encoders such as all-MiniLM-L6-v2): one mask for every layer."""

from raee.backbones.family import ExportableEncoder, register


@register
class Bert(ExportableEncoder):
    name = "bert"
    model_types = ("bert",)
    stack_paths = ("encoder.layer",)
