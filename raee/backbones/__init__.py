"""Backbones: one interface over masked LMs, causal LMs and sentence encoders used zero-shot."""

from raee.backbones.base import Backbone, LayerPass, mean_pool
from raee.backbones.causal_lm import CausalLMBackbone
from raee.backbones.loading import DEFAULT_BACKBONE, load_backbone, resolve_source
from raee.backbones.masked_lm import MaskedLMBackbone
from raee.backbones.sentence_encoder import SentenceEncoderBackbone

__all__ = ["Backbone", "LayerPass", "mean_pool", "CausalLMBackbone", "MaskedLMBackbone", "SentenceEncoderBackbone",
           "DEFAULT_BACKBONE", "load_backbone", "resolve_source"]
