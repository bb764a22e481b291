"""Drive a transformer's layer stack one layer at a time, so that each row stops at its own exit layer.

The model's own forward computes the embeddings and whatever each layer is called with (attention masks, rotary
position embeddings, ...). A pre-hook on the first layer captures those inputs and aborts the forward before any
layer runs; from there we call `layers[i]` ourselves. Rows that have exited are dropped from the batch, together
with their slices of every per-row layer input, so no row ever runs a layer past its exit.
"""

from __future__ import annotations

import inspect
import threading
from typing import Any

import torch
from torch import nn

# Attribute paths, relative to a transformers base model, where the layer stack lives.
LAYER_STACK_PATHS = ("encoder.layer", "layers", "h", "decoder.layers", "transformer.layer", "block", "encoder.layers")


class _LayerInputsCaptured(Exception):
    """Raised by the capture hook to stop the model's forward before its first layer."""


def find_layer_stack(base_model: nn.Module) -> nn.ModuleList:
    for path in LAYER_STACK_PATHS:
        module: Any = base_model
        for part in path.split("."):
            module = getattr(module, part, None)
            if module is None:
                break
        if isinstance(module, nn.ModuleList) and len(module) > 0:
            return module
    raise TypeError(f"cannot find the layer stack of {type(base_model).__name__}; looked at {LAYER_STACK_PATHS}")


# One permanent pre-hook per module we capture from; it captures only for the thread that asked, so threads sharing
# a backbone never see each other's inputs (a hook registered per call would fire for every thread's forward).
_capturing = threading.local()
_install_lock = threading.Lock()


def _capture_hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
    slot = getattr(_capturing, "slot", None)
    if slot is not None and slot["module"] is module:
        slot["args"], slot["kwargs"] = args, kwargs
        raise _LayerInputsCaptured


def capture_inputs(module: nn.Module, run) -> tuple[tuple, dict]:
    """Call run() and stop it as `module` is about to execute; return the (args, kwargs) it was called with."""
    with _install_lock:
        if not getattr(module, "_raee_capture_hook", False):
            module.register_forward_pre_hook(_capture_hook, with_kwargs=True)
            module._raee_capture_hook = True
    slot: dict[str, Any] = {"module": module}
    _capturing.slot = slot
    try:
        run()
    except _LayerInputsCaptured:
        pass
    finally:
        _capturing.slot = None
    if "args" not in slot:
        raise RuntimeError(f"{type(module).__name__} was never called")
    return slot["args"], dict(slot["kwargs"])


def capture_layer_inputs(base_model: nn.Module, layers: nn.ModuleList, input_ids: torch.Tensor,
                         attention_mask: torch.Tensor) -> tuple[torch.Tensor, tuple, dict]:
    """Run the base model's forward up to its first layer; return (hidden (B, T, H), other args, kwargs)."""
    call: dict[str, Any] = {"input_ids": input_ids, "attention_mask": attention_mask}
    if "use_cache" in inspect.signature(base_model.forward).parameters:
        call["use_cache"] = False  # a KV cache would be filled twice when layers are replayed
    args, kwargs = capture_inputs(layers[0], lambda: base_model(**call))
    if args:
        return args[0], tuple(args[1:]), kwargs
    return kwargs.pop("hidden_states"), (), kwargs


def _select_rows(value: Any, keep: torch.Tensor, batch: int) -> Any:
    """Keep rows `keep` of every per-row tensor (dim 0 == batch, 2+ dims) inside args/kwargs; leave the rest."""
    if torch.is_tensor(value):
        return value[keep] if value.dim() >= 2 and value.shape[0] == batch else value
    if isinstance(value, tuple):
        return tuple(_select_rows(v, keep, batch) for v in value)
    if isinstance(value, list):
        return [_select_rows(v, keep, batch) for v in value]
    if isinstance(value, dict):
        return {k: _select_rows(v, keep, batch) for k, v in value.items()}
    return value


class LayerwiseForward:
    """One batch travelling through a layer stack. `layer` is the number of layers already run (0 = embeddings).

    `rows` maps the current batch rows back to the rows of the batch as it started.
    """

    def __init__(self, layers: nn.ModuleList, hidden: torch.Tensor, args: tuple, kwargs: dict,
                 attention_mask: torch.Tensor, answer_positions: torch.Tensor | None = None) -> None:
        self.layers = layers
        self.hidden = hidden  # (B, T, H)
        self.attention_mask = attention_mask  # (B, T), 1 for real tokens
        self.answer_positions = answer_positions  # (B,) token position the head reads, if the kind has one
        self._args, self._kwargs = args, kwargs
        self.layer = 0
        self.start_size = hidden.shape[0]
        self.rows = torch.arange(hidden.shape[0], device=hidden.device)

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @torch.inference_mode()
    def advance(self) -> None:
        """Run the next layer on every row still in the batch."""
        if self.layer >= len(self.layers):
            raise RuntimeError("already at the last layer")
        out = self.layers[self.layer](self.hidden, *self._args, **self._kwargs)
        self.hidden = out[0] if isinstance(out, (tuple, list)) else out
        self.layer += 1

    def keep_rows(self, keep: torch.Tensor) -> None:
        """Drop the rows where `keep` (bool, current batch size) is False."""
        batch = self.hidden.shape[0]
        self.hidden = self.hidden[keep]
        self.attention_mask = self.attention_mask[keep]
        self.rows = self.rows[keep]
        if self.answer_positions is not None:
            self.answer_positions = self.answer_positions[keep]
        self._args = _select_rows(self._args, keep, batch)
        self._kwargs = _select_rows(self._kwargs, keep, batch)
