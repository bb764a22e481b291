"""T5 (encoder-decoder): the candidate layers are the encoder's blocks, then the decoder's blocks at the first
decoding step. Layer l <= L_enc is the encoder after l blocks; layer L_enc + j is the decoder after j blocks, fed
the whole encoder's output. The first block of each stack computes the relative position bias (and the decoder's
first block the cross-attention bias) that the later blocks reuse: the generic path would drop them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from raee.backbones.family import Family, VocabularyHead, register
from raee.backbones.layerwise import capture_layer_inputs

if TYPE_CHECKING:
    from raee.backbones.layerwise import LayerwiseForward


@register
class T5(Family):
    name = "t5"
    model_types = ("t5",)
    final_norm_paths = ()

    def find_stack(self) -> Sequence[nn.Module]:
        # transformers' T5Stack, typed by torch as Tensor | Module when reached by attribute
        self.encoder: Any = self.model.encoder
        self.decoder: Any = self.model.decoder
        self.num_encoder_layers = len(self.encoder.block)
        return [*self.encoder.block, *self.decoder.block]

    def begin(self, input_ids: torch.Tensor,
              attention_mask: torch.Tensor) -> tuple[torch.Tensor, dict[str, Any], dict[str, Any]]:
        hidden, inputs = capture_layer_inputs(self.encoder, self.encoder.block[0],
                                              {"input_ids": input_ids, "attention_mask": attention_mask})
        return hidden, inputs, {}

    def run_layer(self, fwd: LayerwiseForward, index: int) -> torch.Tensor:
        if index == self.num_encoder_layers:
            self._start_decoder(fwd)
        hidden, self_bias, cross_bias = self.layers[index](fwd.hidden, **fwd.inputs)
        if index in (0, self.num_encoder_layers):  # the stack's first block made the biases the others reuse
            fwd.inputs = {**fwd.inputs, "position_bias": self_bias}
            if index == self.num_encoder_layers:
                fwd.inputs["encoder_decoder_position_bias"] = cross_bias
        return hidden

    def _start_decoder(self, fwd: LayerwiseForward) -> None:
        """Leave the encoder (its final norm) and embed the decoder's first step: the start token, attending to
        the encoder's output."""
        encoded = self.encoder.final_layer_norm(fwd.hidden)  # (B, T, H); dropout is off in eval mode
        start = torch.full((encoded.shape[0], 1), self.config.decoder_start_token_id, device=encoded.device)
        fwd.hidden, fwd.inputs = capture_layer_inputs(
            self.decoder, self.decoder.block[0],
            {"input_ids": start, "encoder_hidden_states": encoded, "encoder_attention_mask": fwd.attention_mask})

    @torch.inference_mode()
    def reference_states(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> list[torch.Tensor]:
        start = torch.full((input_ids.shape[0], 1), self.config.decoder_start_token_id, device=input_ids.device)
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, decoder_input_ids=start,
                         output_hidden_states=True, use_cache=False)
        return [*out.encoder_hidden_states, *out.decoder_hidden_states[1:]]

    def comparable(self, layer: int, hidden: torch.Tensor) -> torch.Tensor:
        if layer == self.num_encoder_layers:
            return self.encoder.final_layer_norm(hidden)
        if layer == self.num_layers:
            return self.decoder.final_layer_norm(hidden)
        return hidden

    def stage_heads(self) -> tuple[VocabularyHead, VocabularyHead]:
        """(encoder head, decoder head): each stack's final norm, T5's rescaling of tied embeddings, the LM head."""
        scaled = getattr(self.config, "scale_decoder_outputs", getattr(self.config, "tie_word_embeddings", True))
        scale = self.config.d_model ** -0.5 if scaled else 1.0
        lm_head = self.model.lm_head

        def head(norm: nn.Module) -> VocabularyHead:
            return VocabularyHead(lambda hidden: norm(hidden) * scale, lm_head.weight, lm_head.bias)

        return head(self.encoder.final_layer_norm), head(self.decoder.final_layer_norm)
