"""Backbones: one interface over masked LMs, causal LMs, encoder-decoders and sentence encoders used zero-shot.

A backbone = a model + its tokenizer + its family adapter (raee.backbones.family, one module per family in
raee.backbones.families), read one way (its kind, raee.kinds). Every backbone is self-checked at load.
"""

from raee.backbones.base import Backbone, LayerPass, mean_pool
from raee.backbones.causal_lm import CausalLMBackbone
from raee.backbones.encoder_decoder import EncoderDecoderBackbone
from raee.backbones.family import FAMILIES, Family, adapter_for
from raee.backbones.loading import BACKBONE_CLASSES, DEFAULT_BACKBONE, load_backbone, resolve_source
from raee.backbones.masked_lm import MaskedLMBackbone
from raee.backbones.sentence_encoder import SentenceEncoderBackbone

__all__ = ["Backbone", "LayerPass", "mean_pool", "CausalLMBackbone", "EncoderDecoderBackbone", "MaskedLMBackbone",
           "SentenceEncoderBackbone", "FAMILIES", "Family", "adapter_for", "BACKBONE_CLASSES", "DEFAULT_BACKBONE",
           "load_backbone", "resolve_source"]
