"""OPT: layers under `decoder.layers`; after the last one, the final norm (when the model has one) and the
projection out of the hidden size (when word_embed_proj_dim differs, as in OPT-350m)."""

import torch

from raee.backbones.family import Family, register


@register
class OPT(Family):
    name = "opt"
    model_types = ("opt",)
    stack_paths = ("decoder.layers",)
    final_norm_paths = ("decoder.final_layer_norm",)

    def finalize(self, hidden: torch.Tensor) -> torch.Tensor:
        decoder = self.base.decoder
        if decoder.final_layer_norm is not None:
            hidden = decoder.final_layer_norm(hidden)
        if decoder.project_out is not None:
            hidden = decoder.project_out(hidden)
        return hidden
