"""The load-time self-check: a family adapter must reproduce the model's own forward, or the backbone is refused.

On a short probe batch (rows of different lengths, so padding is exercised; long enough to cross small sliding
windows) the layer-by-layer pass is compared with the model's own `output_hidden_states` pass at every layer, and
the LM kinds' head at full depth with the model's own logits over the whole vocabulary. A difference past float
tolerance raises BackboneError naming the family, the layer and the difference: a wrong answer that looks right is
the worst thing an inference service can give. A passing verdict is cached by weight fingerprint, adapter code,
kind, dtype, device and library versions, so a restart does not repeat the check.
"""

from __future__ import annotations

import hashlib
import inspect
import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from raee import cache
from raee.runtime import Precision

if TYPE_CHECKING:
    from raee.backbones.base import Backbone

log = logging.getLogger(__name__)

PROBE_TEXTS = ("the film was a quiet, clever and often very funny look at a family that never quite works out",
               "dull",
               "a bright story told with warm acting and a fine score")
# (absolute, relative) tolerance per precision: the two passes run the same or equivalent kernels on the same batch,
# so they agree to rounding; half precision rounds coarser. int8 cannot equal the float model: its token states
# must stay close in direction on average (mean cosine), which catches wiring and broken quantization, not the
# expected rounding (all-MiniLM-L6-v2 under dynamic int8: mean cosine 0.95-0.998 per layer, single tokens to 0.84).
TOLERANCE = {"fp32": (1e-4, 1e-3), "fp16": (2e-2, 2e-2), "bf16": (5e-2, 5e-2)}
INT8_MIN_MEAN_COSINE = 0.9


@dataclass(frozen=True)
class SelfCheck:
    """The worst difference found at each layer (hidden states) and at the head (full depth)."""

    family: str
    layer_differences: tuple[float, ...]
    head_difference: float | None
    seconds: float


def verify_backbone(backbone: Backbone) -> SelfCheck | None:
    """Run the self-check unless a passing verdict for the same weights and code is cached; raise BackboneError
    when the adapter does not reproduce the model. Returns the check run, or None when the cache answered."""
    key = _cache_key(backbone)
    if key is not None and cache.read_json(f"selfcheck/{key}.json"):
        log.debug("self-check of %s: cached pass", backbone.source)
        return None
    check = run_self_check(backbone)
    if key is not None:
        cache.write_json(f"selfcheck/{key}.json", {"source": backbone.source, "family": check.family,
                                                     "kind": backbone.kind, "verdict": "pass",
                                                     "layer_differences": list(check.layer_differences),
                                                     "head_difference": check.head_difference})
    log.info("self-check of %s (%s adapter): every layer matches the model's own pass (worst difference %.2g) "
             "in %.2f s", backbone.source, check.family, max(check.layer_differences), check.seconds)
    return check


@torch.inference_mode()
def run_self_check(backbone: Backbone) -> SelfCheck:
    from raee.errors import BackboneError

    started = time.perf_counter()
    family = backbone.family
    prompts = probe_prompts(backbone)
    input_ids, mask = backbone.encode(prompts)
    try:
        reference = family.reference_states(input_ids, mask)
        fwd = backbone.start(prompts)
    except Exception as exc:  # noqa: BLE001 - any failure of an adapter on the probe refuses the backbone
        raise BackboneError(f"{backbone.source}: the {family.name} adapter fails on a probe batch "
                            f"({type(exc).__name__}: {exc}); {_advice(family)}") from None
    if len(reference) != family.num_layers + 1:
        raise BackboneError(f"{backbone.source}: the model reports {len(reference)} hidden states, the "
                            f"{family.name} adapter runs {family.num_layers} layers; {_advice(family)}")
    differences = []
    for layer in range(family.num_layers + 1):
        try:
            ours = family.comparable(layer, fwd.hidden)
        except Exception as exc:  # noqa: BLE001
            raise BackboneError(f"{backbone.source}: the {family.name} adapter fails at layer {layer} "
                                f"({type(exc).__name__}: {exc}); {_advice(family)}") from None
        theirs = reference[layer]
        if ours.shape != theirs.shape:
            raise BackboneError(f"{backbone.source}: at layer {layer} the {family.name} adapter gives a state of "
                                f"shape {tuple(ours.shape)}, the model {tuple(theirs.shape)}; {_advice(family)}")
        real = mask.bool() if ours.shape[1] == mask.shape[1] else torch.ones(ours.shape[:2], dtype=torch.bool)
        difference, off, tolerance = compare_states(ours[real], theirs[real], backbone.precision)
        differences.append(difference)
        if off:
            raise BackboneError(f"{backbone.source}: the {family.name} adapter's state after layer {layer} differs "
                                f"from the model's own hidden state by up to {difference:.3g} ({tolerance}); "
                                f"refusing this backbone rather than serving wrong answers. {_advice(family)}")
        if layer < family.num_layers:
            fwd.advance()
    head_difference = _check_head(backbone, input_ids, mask)
    return SelfCheck(family.name, tuple(differences), head_difference, time.perf_counter() - started)


def probe_prompts(backbone: Backbone) -> list[str]:
    """The probe texts, with a mask token for masked LMs (their head reads it)."""
    if backbone.mask_token:
        return [f"{text} it was {backbone.mask_token} ." for text in PROBE_TEXTS]
    return list(PROBE_TEXTS)


def compare_states(ours: torch.Tensor, theirs: torch.Tensor, precision: Precision) -> tuple[float, bool, str]:
    """(max |difference|, whether it is past the tolerance of `precision`, the tolerance in words); rows are
    vectors (N, D)."""
    ours, theirs = ours.float(), theirs.float()
    difference = (ours - theirs).abs()
    if precision == "int8":
        cosine = float(torch.nn.functional.cosine_similarity(ours, theirs, dim=-1).mean())
        return float(difference.max()), cosine < INT8_MIN_MEAN_COSINE, (
            f"int8: mean cosine {cosine:.3f}, at least {INT8_MIN_MEAN_COSINE} required")
    atol, rtol = TOLERANCE.get(precision, TOLERANCE["fp32"])
    off = bool((difference > atol + rtol * theirs.abs()).any())
    return float(difference.max()), off, f"tolerance {atol:g} + {rtol:g} x |value|"


def _check_head(backbone: Backbone, input_ids: torch.Tensor, mask: torch.Tensor) -> float | None:
    """LM kinds: our head on our full-depth state against the model's own logits, every token of the vocabulary,
    at every real position (decoder: the first step). Quantized runtimes read the same torch head as their float
    twin, whose wiring this checks; their states are checked above."""
    from raee.backbones.language_model import LanguageModelBackbone
    from raee.errors import BackboneError

    if not isinstance(backbone, LanguageModelBackbone) or backbone.precision == "int8":
        return None
    fwd = backbone.start(probe_prompts(backbone))
    while fwd.layer < backbone.num_layers:
        fwd.advance()
    call: dict[str, Any] = {"input_ids": input_ids, "attention_mask": mask}
    if backbone.kind == "encoder-decoder":
        call["decoder_input_ids"] = torch.full((input_ids.shape[0], 1), backbone.model.config.decoder_start_token_id,
                                               device=input_ids.device)
    if "use_cache" in inspect.signature(backbone.model.forward).parameters:
        call["use_cache"] = False
    theirs = backbone.model(**call).logits  # (B, T, V)
    real = mask.bool() if theirs.shape[1] == mask.shape[1] else torch.ones(theirs.shape[:2], dtype=torch.bool)
    head = backbone.vocabulary_head(backbone.num_layers)
    ours = head.logits(fwd.hidden[real])
    difference, off, _ = compare_states(ours, theirs[real], backbone.precision)
    if off:
        raise BackboneError(f"{backbone.source}: the {backbone.family.name} adapter's {backbone.kind} head gives "
                            f"logits up to {difference:.3g} away from the model's own at full depth; refusing this "
                            f"backbone. {_advice(backbone.family)}")
    return difference


def _advice(family: Any) -> str:
    from raee.backbones.family import FAMILIES

    if family.name == "generic":
        return (f"model type {family.config.model_type!r} has no raee adapter and the generic layer-by-layer path "
                f"does not reproduce it; supported families: {', '.join(sorted(FAMILIES))} (a new family is one "
                "module in raee/backbones/families/)")
    return "this checkpoint differs from what the adapter expects; please report it with the model's config"


def _cache_key(backbone: Backbone) -> str | None:
    """What a verdict is about: the weights, the config, the adapter's and the kind's code, dtype, device and
    library versions. None (never cached) where the adapter's code cannot be read."""
    import transformers

    import raee

    classes = [cls for cls in (*type(backbone.family).__mro__, *type(backbone).__mro__) if cls is not object]
    try:
        code = [inspect.getsource(cls) for cls in classes]
    except (OSError, TypeError):
        return None
    parts = [backbone.fingerprint(), backbone.model.config.to_json_string(), backbone.kind, *code,
             str(backbone.dtype), backbone.runtime, backbone.precision, str(getattr(backbone.family, "directory", "")),
             backbone.device.type, torch.__version__, transformers.__version__, raee.__version__]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:32]
