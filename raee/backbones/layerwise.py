"""Drive a transformer's layers one at a time, so that each row stops at its own exit layer.

The model's own forward computes the embeddings and whatever its first layer is called with (attention masks,
rotary position embeddings, ...): a pre-hook on that layer captures those inputs and aborts the forward before any
layer runs. From there the family adapter (raee.backbones.family) calls the layers itself, passing on what each
layer hands the next. Rows that have exited are dropped from the batch, with their slices of every per-row input,
so no row ever runs a layer past its exit.
"""

from __future__ import annotations

import copy
import inspect
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

if TYPE_CHECKING:
    from raee.backbones.family import Family


class _LayerInputsCaptured(Exception):
    """Raised by the capture hook to stop the model's forward before the hooked module runs."""


# One permanent pre-hook per module we capture from; it captures only for the thread that asked, so threads sharing
# a backbone never see each other's inputs (a hook registered per call would fire for every thread's forward).
_capturing = threading.local()
_install_lock = threading.Lock()


def _capture_hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
    slot = getattr(_capturing, "slot", None)
    if slot is not None and slot["module"] is module:
        slot["args"], slot["kwargs"] = args, kwargs
        raise _LayerInputsCaptured


def capture_inputs(module: nn.Module, run: Callable[[], Any]) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """Call run() and stop it as `module` is about to execute; return the (args, kwargs) it was called with."""
    with _install_lock:
        if not getattr(module, "_raee_capture_hook", False):
            module.register_forward_pre_hook(_capture_hook, with_kwargs=True)
            module._raee_capture_hook = True  # type: ignore[assignment]  # torch types attributes Tensor | Module
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


def as_keywords(layer: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[torch.Tensor, dict[str, Any]]:
    """(hidden, every other input by name) for a layer call: positional inputs are named by the layer's signature,
    so a family adapter can replace one (a position bias, a mask) whatever position the model passed it in."""
    signature = inspect.signature(layer.forward)
    bound = signature.bind(*args, **kwargs)
    named: dict[str, Any] = {}
    for name, value in bound.arguments.items():
        parameter = signature.parameters[name]
        if parameter.kind is inspect.Parameter.VAR_KEYWORD:
            named.update(value)
        elif parameter.kind is inspect.Parameter.VAR_POSITIONAL:
            raise TypeError(f"{type(layer).__name__} takes *{name}; its inputs cannot be named")
        else:
            named[name] = value
    first = next(iter(signature.parameters))
    return named.pop(first), named


def capture_layer_inputs(base_model: nn.Module, layer: nn.Module,
                         call: dict[str, Any]) -> tuple[torch.Tensor, dict[str, Any]]:
    """Run base_model(**call) up to `layer`; return (its hidden input (B, T, H), its other inputs by name)."""
    if "use_cache" in inspect.signature(base_model.forward).parameters:
        call = {**call, "use_cache": False}  # a KV cache would be filled twice when layers are replayed
    args, kwargs = capture_inputs(layer, lambda: base_model(**call))
    return as_keywords(layer, args, kwargs)


def rows_of(tensor: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """tensor[rows] for rows given as a bool mask or as indices over dim 0; a mask that keeps every row returns the
    tensor itself, without the copy (about 20 us on CPU): a head read at batch 1, or of a batch leaving at one layer."""
    every = rows.dtype == torch.bool and rows.numel() == tensor.shape[0] and bool(rows.all())
    return tensor if every else tensor[rows]


def select_rows(value: Any, keep: torch.Tensor, batch: int, shared: frozenset[str] = frozenset()) -> Any:
    """Keep rows `keep` of every per-row tensor (2+ dims, dim 0 == batch) inside nested tuples, lists and dicts;
    leave the rest, and dict entries named in `shared` (inputs that are not per-row whatever their shape)."""
    if torch.is_tensor(value):
        return value[keep] if value.dim() >= 2 and value.shape[0] == batch else value
    if isinstance(value, tuple):
        return tuple(select_rows(v, keep, batch, shared) for v in value)
    if isinstance(value, list):
        return [select_rows(v, keep, batch, shared) for v in value]
    if isinstance(value, dict):
        return {k: v if k in shared else select_rows(v, keep, batch, shared) for k, v in value.items()}
    return value


class LayerwiseForward:
    """One batch travelling through a backbone's layers. `layer` is the number of layers already run
    (0 = embeddings); `rows` maps the current batch rows back to the rows of the batch as it started.

    `inputs` are the keyword inputs every layer is called with; `carry` is what the family passes from one layer
    to the next (a position bias, the embeddings DeBERTa's conv reads, the encoder states of an encoder-decoder).
    """

    def __init__(self, family: Family, hidden: torch.Tensor, inputs: dict[str, Any], attention_mask: torch.Tensor,
                 answer_positions: torch.Tensor | None = None, carry: dict[str, Any] | None = None) -> None:
        self.family = family
        self.hidden = hidden  # (B, T, H)
        self.inputs = inputs
        self.carry = carry if carry is not None else {}
        self.attention_mask = attention_mask  # (B, T), 1 for real tokens
        self.answer_positions = answer_positions  # (B,) token position the head reads, if the kind has one
        self.layer = 0
        self.start_size = hidden.shape[0]
        self.rows = torch.arange(hidden.shape[0], device=hidden.device)

    @property
    def num_layers(self) -> int:
        return self.family.num_layers

    @torch.inference_mode()
    def advance(self) -> None:
        """Run the next layer on every row still in the batch."""
        if self.layer >= self.family.num_layers:
            raise RuntimeError("already at the last layer")
        self.hidden = self.family.run_layer(self, self.layer)
        self.layer += 1

    def snapshot(self) -> "LayerwiseForward":
        """This state as it is now, for reading the head here later: a shallow copy whose dicts are its own. Layers
        replace `hidden` rather than write into it, so no tensor is copied."""
        state = copy.copy(self)
        state.inputs, state.carry = dict(self.inputs), dict(self.carry)
        return state

    def keep_rows(self, keep: torch.Tensor) -> None:
        """Drop the rows where `keep` (bool, current batch size) is False."""
        batch, shared = self.hidden.shape[0], self.family.shared_inputs
        self.hidden = self.hidden[keep]
        self.attention_mask = self.attention_mask[keep]
        self.rows = self.rows[keep]
        if self.answer_positions is not None:
            self.answer_positions = self.answer_positions[keep]
        self.inputs = select_rows(self.inputs, keep, batch, shared)
        self.carry = select_rows(self.carry, keep, batch, shared)
        self._trim_padding()

    def _trim_padding(self) -> None:
        """Cut the token positions that are padding for every remaining row (the longest row may have left), where
        the family adapter can: later layers then run on the remaining rows' own width. Rows are right-padded."""
        if not self.rows.numel():
            return
        real = self.attention_mask.bool().any(dim=0)
        width = int(real.nonzero().max()) + 1 if bool(real.any()) else 1
        if width >= self.attention_mask.shape[1]:
            return
        trimmed = self.family.trim_tokens(self.inputs, self.carry, width)
        if trimmed is None:
            return
        self.inputs, self.carry = trimmed
        self.hidden = self.hidden[:, :width]
        self.attention_mask = self.attention_mask[:, :width]
