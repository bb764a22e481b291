"""Family adapters: how one model architecture (a transformers `config.model_type`) runs layer by layer.

An adapter says where the layer stack, the final norm and the output head are, and what passes from one layer to
the next. The base class is the generic path: capture what the model's own forward hands its first layer and hand
the same to every layer. Families whose layers need more (a relative position bias made by the first layer, a conv
after the first layer, masks that differ by layer type) override `begin` and `run_layer`; families whose output
head is not the generic one override `mlm_head` or `lm_head`. A new family is one small module in
raee/backbones/families/ that subclasses Family and registers itself with `@register`.

Whatever the adapter, a backbone checks it at load (raee.backbones.selfcheck): the truncated state at every layer
must equal the model's own `output_hidden_states` pass, or the backbone is refused.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, cast

import torch
from torch import nn

from raee.backbones.layerwise import capture_inputs, capture_layer_inputs
from raee.errors import BackboneError
from raee.runtime import DTYPE_PRECISION, DType, Precision, Runtime

if TYPE_CHECKING:
    from raee.backbones.base import Backbone
    from raee.backbones.layerwise import LayerwiseForward

# Attribute paths, relative to a transformers base model, where a layer stack may live (the generic path).
LAYER_STACK_PATHS = ("encoder.layer", "layers", "h", "decoder.layers", "transformer.layer", "block", "encoder.layers")
# Where a decoder's final norm may live, relative to the base model (the generic path).
FINAL_NORM_PATHS = ("norm", "ln_f", "final_layer_norm", "final_norm", "decoder.final_layer_norm")


@dataclass(frozen=True)
class PrefixStates:
    """What `Family.run_prefix` gives: the batch's state after the embeddings and after each of layers 1..K, the
    inputs and carry every later layer gets (as `begin` gives them), and the prefix keys pooled at layer K."""

    states: list[torch.Tensor]  # K + 1 of (B, T, H)
    inputs: dict[str, Any]
    carry: dict[str, Any]
    keys: torch.Tensor  # (B, H), L2-normalised (raee.backbones.base.mean_pool)


@dataclass(frozen=True)
class VocabularyHead:
    """An LM's output head as features then a vocabulary projection: logits = cap(features(h) @ weight.T + bias).

    Reading a label word needs only its row of `weight`: C rows instead of the whole vocabulary.
    """

    features: Callable[[torch.Tensor], torch.Tensor]  # (R, H) -> (R, F): everything before the projection
    weight: torch.Tensor  # (V, F)
    bias: torch.Tensor | None  # (V,)
    softcap: float | None = None  # logits -> softcap * tanh(logits / softcap) (Gemma-2's final_logit_softcapping)

    def logits(self, hidden: torch.Tensor, ids: torch.Tensor | None = None) -> torch.Tensor:
        """(R, H) -> (R, len(ids)) logits of the token ids (every token when ids is None)."""
        weight = self.weight if ids is None else self.weight[ids]
        bias = self.bias if self.bias is None or ids is None else self.bias[ids]
        logits = nn.functional.linear(self.features(hidden), weight, bias)
        if self.softcap:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits


class Family:
    """The generic adapter; subclasses are the adapters of known families."""

    name: ClassVar[str] = "generic"
    model_types: ClassVar[tuple[str, ...]] = ()  # transformers config.model_type values this adapter serves
    stack_paths: ClassVar[tuple[str, ...]] = LAYER_STACK_PATHS
    final_norm_paths: ClassVar[tuple[str, ...]] = FINAL_NORM_PATHS  # a norm after the last layer (decoders)
    shared_inputs: ClassVar[frozenset[str]] = frozenset()  # layer inputs that are not per-row whatever their shape

    runtime: Runtime = "torch"  # what runs the layers; raee.backbones.onnx swaps in onnxruntime
    exportable: ClassVar[bool] = False  # whether `embed` and `export_layer` give graphs onnxruntime can run

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.config: Any = model.config  # a transformers PretrainedConfig, read by the names each family knows
        self.base: nn.Module = getattr(model, getattr(model, "base_model_prefix", ""), model)
        self.layers: Sequence[nn.Module] = self.find_stack()
        self.final_norm: nn.Module | None = _first_module(self.base, self.final_norm_paths)

    def __repr__(self) -> str:
        return f"{self.name} adapter ({self.config.model_type})"

    # -- structure -----------------------------------------------------------------------------------------------
    def find_stack(self) -> Sequence[nn.Module]:
        for path in self.stack_paths:
            module = _module_at(self.base, path)
            if isinstance(module, nn.ModuleList) and len(module) > 0:
                return cast(Sequence[nn.Module], module)
        raise BackboneError(f"cannot find the layer stack of {type(self.base).__name__}; looked at "
                            f"{', '.join(self.stack_paths)}")

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    # -- layer by layer --------------------------------------------------------------------------------------------
    def begin(self, input_ids: torch.Tensor,
              attention_mask: torch.Tensor) -> tuple[torch.Tensor, dict[str, Any], dict[str, Any]]:
        """Embed a batch: (hidden (B, T, H) before the first layer, the inputs every layer gets, carry)."""
        hidden, inputs = capture_layer_inputs(self.base, self.layers[0],
                                              {"input_ids": input_ids, "attention_mask": attention_mask})
        return hidden, inputs, {}

    def run_layer(self, fwd: LayerwiseForward, index: int) -> torch.Tensor:
        """Run layer `index` on the rows of `fwd`; return the new hidden state (the adapter may update fwd.carry)."""
        return layer_output(self.layers[index](fwd.hidden, **fwd.inputs))

    def trim_tokens(self, inputs: dict[str, Any], carry: dict[str, Any],
                    width: int) -> tuple[dict[str, Any], dict[str, Any]] | None:
        """The layer inputs and carry cut to the first `width` token positions, or None where this adapter cannot
        say which of its inputs have a token axis (the batch then keeps its padding). Called when rows leave and
        the rest are all shorter: the positions cut are padding for every remaining row."""
        return None

    def prepare_prefix(self, backbone: Backbone, depth: int) -> bool:
        """Ready `run_prefix` for keys pooled at layer `depth`, where this adapter has a faster way than layer by
        layer (before traffic, so that no request pays for it); whether it did."""
        return False

    def run_prefix(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                   depth: int) -> PrefixStates | None:
        """The embeddings and layers 1..depth in one call, or None where `prepare_prefix` readied nothing for this
        depth (the caller then runs the layers one by one)."""
        return None

    @property
    def precision(self) -> Precision:
        """fp32, fp16, bf16 (the torch weights' dtype) or int8 (a quantized runtime)."""
        dtype = str(next(self.model.parameters()).dtype).removeprefix("torch.")
        return DTYPE_PRECISION[cast(DType, dtype)]

    def finalize(self, hidden: torch.Tensor) -> torch.Tensor:
        """What the model applies after its last layer before reporting it (a decoder's final norm)."""
        return self.final_norm(hidden) if self.final_norm is not None else hidden

    # -- the model's own pass, which the self-check compares with ---------------------------------------------------
    @torch.inference_mode()
    def reference_states(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> list[torch.Tensor]:
        """The model's own hidden states (num_layers + 1 of them, the last one as the model reports it)."""
        call: dict[str, Any] = {"input_ids": input_ids, "attention_mask": attention_mask,
                                "output_hidden_states": True}
        if "use_cache" in inspect.signature(self.base.forward).parameters:
            call["use_cache"] = False
        return list(self.base(**call).hidden_states)

    def comparable(self, layer: int, hidden: torch.Tensor) -> torch.Tensor:
        """Our state at `layer` in the form the model reports it (its final norm applied at the last layer)."""
        return self.finalize(hidden) if layer == self.num_layers else hidden

    # -- output heads ------------------------------------------------------------------------------------------------
    def mlm_head(self) -> VocabularyHead:
        """A masked LM's head: the model's one head module beside its base model, cut before its vocabulary
        projection (families with another layout override this)."""
        return _mlm_head(self.model, self.base)

    def lm_head(self) -> VocabularyHead:
        """A causal LM's head ("logit lens"): what the model applies after its last layer, then the output
        embeddings."""
        out = self.model.get_output_embeddings()
        if not isinstance(out, nn.Linear):
            raise BackboneError(f"{type(self.model).__name__} has no linear LM head")
        return VocabularyHead(self.finalize, out.weight, out.bias)


def layer_output(out: Any) -> torch.Tensor:
    """The hidden state a layer returns (a tensor, or the first item of a tuple)."""
    return out[0] if isinstance(out, (tuple, list)) else out


FAMILIES: dict[str, type[Family]] = {}


def register(cls: type[Family]) -> type[Family]:
    """Class decorator: make `cls` the adapter for its model types."""
    for model_type in cls.model_types:
        if model_type in FAMILIES:
            raise ValueError(f"two adapters for model type {model_type!r}: {FAMILIES[model_type].__name__} and "
                             f"{cls.__name__}")
        FAMILIES[model_type] = cls
    return cls


def adapter_for(model: nn.Module) -> Family:
    """The registered adapter of the model's family, or the generic one (which the self-check then judges)."""
    import raee.backbones.families  # noqa: F401 - registers every family module

    return FAMILIES.get(getattr(model.config, "model_type", ""), Family)(model)


def _module_at(root: nn.Module, path: str) -> Any:
    module: Any = root
    for part in path.split("."):
        module = getattr(module, part, None)
        if module is None:
            return None
    return module


def _first_module(root: nn.Module, paths: Sequence[str]) -> nn.Module | None:
    for path in paths:
        module = _module_at(root, path)
        if isinstance(module, nn.Module):
            return module
    return None


def _mlm_head(model: nn.Module, base: nn.Module) -> VocabularyHead:
    """The module mapping a hidden state to vocabulary logits, the model's one child beside its base model, split
    at its one Linear onto the vocabulary: the features are what that Linear is called with."""
    heads = [m for _, m in model.named_children() if m is not base and any(True for _ in m.parameters())]
    if len(heads) != 1:
        raise BackboneError(f"cannot tell the MLM head of {type(model).__name__}: children "
                            f"{[n for n, _ in model.named_children()]}; add a family adapter")
    head = heads[0]
    projections = [m for m in head.modules() if isinstance(m, nn.Linear) and m.out_features == model.config.vocab_size]
    if len(projections) != 1:
        raise BackboneError(f"cannot find the vocabulary projection of {type(head).__name__}; add a family adapter")
    projection = projections[0]

    def features(hidden: torch.Tensor) -> torch.Tensor:
        args, kwargs = capture_inputs(projection, lambda: head(hidden))
        return args[0] if args else kwargs["input"]

    return VocabularyHead(features, projection.weight, projection.bias)


class LayerTypedMasks(Family):
    """Families whose layers attend differently by `config.layer_types` (full or sliding-window attention): the
    model makes one mask per type and gives each layer its type's. Capturing the first layer's inputs would give
    every layer the first layer's mask, so the masks are made here with the model's own mask functions and handed
    to its forward (which takes a ready mapping) and to each layer."""

    def begin(self, input_ids: torch.Tensor,
              attention_mask: torch.Tensor) -> tuple[torch.Tensor, dict[str, Any], dict[str, Any]]:
        from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

        makers = {"full_attention": create_causal_mask, "sliding_attention": create_sliding_window_causal_mask}
        types = set(self.config.layer_types)
        if not types <= set(makers):
            raise BackboneError(f"{self}: layer types {sorted(types - set(makers))} are not supported")
        shape_source = self.model.get_input_embeddings()(input_ids)  # the mask functions read shape, dtype, device
        positions = torch.arange(input_ids.shape[1], device=input_ids.device).unsqueeze(0)
        masks = {t: makers[t](config=self.config, inputs_embeds=shape_source, attention_mask=attention_mask,
                              cache=None, position_ids=positions) for t in types}
        hidden, inputs = capture_layer_inputs(self.base, self.layers[0],
                                              {"input_ids": input_ids, "attention_mask": masks})
        return hidden, inputs, {"masks": masks}

    def run_layer(self, fwd: LayerwiseForward, index: int) -> torch.Tensor:
        inputs = {**fwd.inputs, "attention_mask": fwd.carry["masks"][self.config.layer_types[index]]}
        return layer_output(self.layers[index](fwd.hidden, **inputs))


class ExportableEncoder(Family):
    """Encoder families whose layers need only the hidden state and the padding mask (BERT and its kin): each layer
    exports to one ONNX graph (hidden (B, T, H), mask (B, T)) -> hidden, and the embeddings to another, which is how
    the onnxruntime runtime stops at any layer."""

    exportable = True
    final_norm_paths = ()

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """What the model does before its first layer: input_ids (B, T) -> hidden (B, T, H)."""
        return self.base.embeddings(input_ids=input_ids)

    def export_layer(self, index: int) -> nn.Module:
        return _MaskedLayer(self.layers[index])


class _MaskedLayer(nn.Module):
    """One encoder layer as a function of (hidden, 0/1 padding mask): the additive mask is made inside, as eager
    attention takes it."""

    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        additive = (1.0 - mask[:, None, None, :].to(hidden.dtype)) * torch.finfo(hidden.dtype).min  # (B, 1, 1, T)
        return layer_output(self.layer(hidden, attention_mask=additive))
