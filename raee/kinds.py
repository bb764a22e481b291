"""The backbone kinds: how a zero-shot backbone turns its hidden states into label scores.

A kind is a reading of the model (which position, which head); a *family* (raee.backbones.families) is how one
model architecture runs layer by layer. This module is light (no torch) so that task files, CLIs and clients can
name kinds without loading a model.
"""

from __future__ import annotations

from typing import Literal, get_args

Kind = Literal["masked-lm", "causal-lm", "encoder-decoder", "sentence-encoder"]
KINDS: tuple[Kind, ...] = get_args(Kind)
KIND_HELP: dict[Kind, str] = {
    "masked-lm": "an encoder with its MLM head, read at the mask token (BERT, RoBERTa, DeBERTa-v2, ELECTRA, ...)",
    "causal-lm": "a decoder LM, read at the last token through its final norm and LM head (GPT-2, Llama, ...)",
    "encoder-decoder": "an encoder-decoder LM (T5): encoder layers, then the decoder's layers at the first step",
    "sentence-encoder": "a sentence-transformers encoder, scored by cosine to each label's verbalizations",
}
# Kinds whose head reads label words from the model's vocabulary (all but the sentence encoder).
LM_KINDS: tuple[Kind, ...] = ("masked-lm", "causal-lm", "encoder-decoder")
# Kinds that generate the answer after the prompt: their prompts must not end with a space, because each label
# word is read as its own space-prefixed token.
GENERATING_KINDS: tuple[Kind, ...] = ("causal-lm", "encoder-decoder")
# The sentence-encoder kind's cosine scale (inverse softmax temperature over the label verbalizations).
DEFAULT_SCALE = 20.0
