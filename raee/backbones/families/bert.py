"""BERT (masked LM, and the bert-style sentence encoders such as all-MiniLM-L6-v2): one mask for every layer."""

from raee.backbones.family import Family, register


@register
class Bert(Family):
    name = "bert"
    model_types = ("bert",)
    stack_paths = ("encoder.layer",)
    final_norm_paths = ()
