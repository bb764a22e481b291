"""Sentence-transformers pooling, read from the checkpoint's own Pooling module config (1_Pooling/config.json):
the sentence-encoder kind pools every layer the way the checkpoint pools its last one."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from raee.errors import BackboneError

POOLING_MODES = ("cls", "max", "mean", "mean_sqrt_len_tokens", "weightedmean", "lasttoken")
# sentence-transformers' older config format: one boolean per mode, in its concatenation order
_LEGACY_KEYS = {"pooling_mode_cls_token": "cls", "pooling_mode_max_tokens": "max",
                "pooling_mode_mean_tokens": "mean", "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len_tokens",
                "pooling_mode_weightedmean_tokens": "weightedmean", "pooling_mode_lasttoken": "lasttoken"}
# modules a sentence-transformers checkpoint may hold around its transformer without changing what we compare
_HARMLESS_MODULES = ("Transformer", "Pooling", "Normalize")


@dataclass(frozen=True)
class Pooling:
    """How token states (B, T, H) become one vector per row; several modes are concatenated in order."""

    modes: tuple[str, ...] = ("mean",)

    def __post_init__(self) -> None:
        unknown = [m for m in self.modes if m not in POOLING_MODES]
        if not self.modes or unknown:
            raise BackboneError(f"pooling modes {list(self.modes)}: each must be one of {', '.join(POOLING_MODES)}")

    def __str__(self) -> str:
        return "+".join(self.modes)

    @classmethod
    def parse(cls, text: str) -> "Pooling":
        return cls(tuple(text.split("+")))

    def __call__(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """(B, T, H), (B, T) right-padded -> (B, H * len(modes)), not normalised. Only what the modes read is
        computed (a served batch-1 head read runs a handful of small torch ops, each 5-20 us)."""
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)  # (B, T, 1)
        vectors = []
        for mode in self.modes:
            if mode == "cls":
                vectors.append(hidden[:, 0])
            elif mode == "max":
                vectors.append(hidden.masked_fill(mask == 0, float("-inf")).max(dim=1).values)
            elif mode in ("mean", "mean_sqrt_len_tokens"):
                total = (hidden * mask).sum(dim=1)
                count = mask.sum(dim=1).clamp(min=1e-9)
                vectors.append(total / (count if mode == "mean" else count.sqrt()))
            elif mode == "weightedmean":
                weights = mask * torch.arange(1, hidden.shape[1] + 1, device=hidden.device,
                                              dtype=hidden.dtype).view(1, -1, 1)
                vectors.append((hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1e-9))
            else:  # lasttoken
                rows = torch.arange(hidden.shape[0], device=hidden.device)
                vectors.append(hidden[rows, (attention_mask.sum(dim=1) - 1).clamp(min=0)])
        return vectors[0] if len(vectors) == 1 else torch.cat(vectors, dim=-1)


def checkpoint_pooling(path: Path) -> Pooling:
    """The pooling a sentence-transformers checkpoint directory declares (mean when it declares none). Refuses
    modules that would change the embedding after pooling (Dense, ...), since every layer is read through the
    same pooling and the last layer would then not be the model's own embedding."""
    modules_file = path / "modules.json"
    if not modules_file.is_file():
        return Pooling()
    try:
        modules = json.loads(modules_file.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise BackboneError(f"{modules_file}: unreadable: {exc}") from None
    pooling = Pooling()
    for module in modules:
        kind = str(module.get("type", "")).rsplit(".", 1)[-1]
        if kind not in _HARMLESS_MODULES:
            raise BackboneError(f"{path}: sentence-transformers module {module.get('type')} after the transformer "
                                "is not supported (raee reads every layer through the pooling alone)")
        if kind == "Pooling":
            pooling = _read_pooling(path / module.get("path", ""))
    return pooling


def _read_pooling(directory: Path) -> Pooling:
    config_file = directory / "config.json"
    try:
        config = json.loads(config_file.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise BackboneError(f"{config_file}: unreadable pooling config: {exc}") from None
    if config.get("include_prompt") is False:
        raise BackboneError(f"{config_file}: include_prompt false is not supported")
    mode = config.get("pooling_mode")
    if mode is None:
        modes = tuple(name for key, name in _LEGACY_KEYS.items() if config.get(key)) or ("mean",)
    else:
        modes = (mode,) if isinstance(mode, str) else tuple(mode)
    return Pooling(modes)
