"""The backbone interface: label scores at every layer in one pass, and passes that stop at each row's exit layer."""

from __future__ import annotations

import hashlib
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from raee.backbones.layerwise import LayerwiseForward, capture_layer_inputs, find_layer_stack
from raee.errors import InputError
from raee.tasks import TaskDefinition

# A text longer than this many characters per allowed token is refused before tokenizing (cheap guard).
MAX_CHARS_PER_TOKEN = 32


@dataclass
class LayerPass:
    """What a full pass over a batch gives: label logits at every layer 0..L and, on request, pooled keys."""

    label_logits: np.ndarray  # (B, L+1, C) float32
    pooled: dict[int, np.ndarray]  # layer -> (B, H) L2-normalised mean-pooled hidden state


class Backbone(ABC):
    """A transformer used zero-shot: a prompt, a layer stack, and a head that gives label scores at any layer."""

    kind: str = ""

    def __init__(self, model: nn.Module, tokenizer, *, source: str, max_tokens: int | None = None) -> None:
        self.model = model.eval()
        self.base = getattr(model, getattr(model, "base_model_prefix", ""), model)
        self.layers = find_layer_stack(self.base)
        self.tokenizer = tokenizer
        self.tokenizer.padding_side = "right"  # positions of real tokens then match the unpadded row
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token or self.tokenizer.unk_token
        # A fast tokenizer keeps its padding/truncation settings on one shared Rust object, so concurrent calls
        # (a server validating requests while its batcher tokenizes a batch) corrupt each other. One lock per backbone.
        self._tokenizer_lock = threading.Lock()
        self.source = source
        self.max_tokens = max_tokens or _model_max_tokens(model, tokenizer)
        self._fingerprint: str | None = None

    # -- what each kind defines ------------------------------------------------------------------------------
    @abstractmethod
    def label_logits(self, fwd: LayerwiseForward, rows: torch.Tensor, task: TaskDefinition) -> torch.Tensor:
        """Label logits (len(rows), C) for the current rows `rows` (bool or index) of `fwd` at `fwd.layer`."""

    def answer_positions(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Token position (B,) the head reads; by default the last real token."""
        return attention_mask.sum(dim=1) - 1

    def prepare(self, task: TaskDefinition) -> None:
        """Compute what the head needs for a task (label token ids, verbalization states) ahead of traffic."""

    def settings(self) -> dict:
        """Settings that change the label scores; saved in the store manifest and checked on load."""
        return {}

    # -- shared machinery --------------------------------------------------------------------------------------
    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def identity(self) -> dict:
        return {"source": self.source, "kind": self.kind, "num_layers": self.num_layers,
                "fingerprint": self.fingerprint(), "dtype": str(next(self.model.parameters()).dtype).removeprefix(
                    "torch."), "settings": self.settings()}

    def fingerprint(self) -> str:
        """Hash of every weight (names, shapes, dtypes, bytes): ties a store to the exact weights it was built on."""
        if self._fingerprint is None:
            self._fingerprint = fingerprint_module(self.model)
        return self._fingerprint

    def prompt(self, text: str, task: TaskDefinition) -> str:
        template = task.template_for(self.kind)
        if "{mask}" in template:
            template = template.replace("{mask}", self.tokenizer.mask_token)
        return template.replace("{x}", text)

    def check_texts(self, texts: list[str]) -> None:
        """Raise InputError for an empty batch, an empty text or one too long to read; name the text's index."""
        if isinstance(texts, (str, bytes)) or not isinstance(texts, (list, tuple)):
            raise InputError(f"texts must be a list of strings, got {type(texts).__name__}")
        if not texts:
            raise InputError("no texts given")
        for i, text in enumerate(texts):
            if not isinstance(text, str) or not text.strip():
                raise InputError(f"text {i} is empty")
            if len(text) > self.max_tokens * MAX_CHARS_PER_TOKEN:
                raise InputError(f"text {i} has {len(text)} characters, more than this backbone reads "
                                 f"({self.max_tokens} tokens)")

    def check_prompts(self, texts: list[str], task: TaskDefinition) -> None:
        """Raise InputError for a text that would fail in a batch: too many tokens with its prompt, or (masked LMs)
        not exactly one mask token after prompting. Lets a server refuse it before it joins other requests."""
        self.check_texts(texts)
        prompts = [self.prompt(t, task) for t in texts]
        with self._tokenizer_lock:
            encoded = self.tokenizer(prompts)["input_ids"]
        for i, ids in enumerate(encoded):
            if len(ids) > self.max_tokens:
                raise InputError(f"text {i} is {len(ids)} tokens with its prompt; the limit is {self.max_tokens}")
            self._check_prompt_ids(i, ids)

    def _check_prompt_ids(self, index: int, ids: list[int]) -> None:
        """Kind-specific checks of one tokenized prompt."""

    def token_counts(self, texts: list[str], task: TaskDefinition) -> list[int]:
        prompts = [self.prompt(t, task) for t in texts]
        with self._tokenizer_lock:
            encoded = self.tokenizer(prompts)["input_ids"]
        return [len(ids) for ids in encoded]

    @torch.inference_mode()
    def start(self, texts: list[str], task: TaskDefinition) -> LayerwiseForward:
        """Embed a batch (layer 0); nothing of the layer stack has run yet."""
        self.check_texts(texts)
        with self._tokenizer_lock:
            enc = self.tokenizer([self.prompt(t, task) for t in texts], padding=True, return_tensors="pt")
        lengths = enc["attention_mask"].sum(dim=1)
        too_long = (lengths > self.max_tokens).nonzero().flatten().tolist()
        if too_long:
            i = too_long[0]
            raise InputError(f"text {i} is {int(lengths[i])} tokens with its prompt; this backbone reads at most "
                             f"{self.max_tokens}")
        input_ids = enc["input_ids"].to(self.device)
        mask = enc["attention_mask"].to(self.device)
        positions = self.answer_positions(input_ids, mask)
        hidden, args, kwargs = capture_layer_inputs(self.base, self.layers, input_ids, mask)
        return LayerwiseForward(self.layers, hidden, args, kwargs, mask, positions)

    @torch.inference_mode()
    def all_layers(self, texts: list[str], task: TaskDefinition, pooled_layers: tuple[int, ...] = ()) -> LayerPass:
        """Label logits at every layer 0..L in one pass (for indexing), and pooled states at `pooled_layers`."""
        fwd = self.start(texts, task)
        everything = torch.ones(len(texts), dtype=torch.bool, device=self.device)
        logits, pooled = [], {}
        while True:
            logits.append(self.label_logits(fwd, everything, task).float())
            if fwd.layer in pooled_layers:
                pooled[fwd.layer] = mean_pool(fwd.hidden, fwd.attention_mask).cpu().numpy()
            if fwd.layer == self.num_layers:
                break
            fwd.advance()
        return LayerPass(torch.stack(logits, dim=1).cpu().numpy(), pooled)

    @torch.inference_mode()
    def pooled_every_layer(self, texts: list[str], task: TaskDefinition) -> torch.Tensor:
        """(B, L+1, H) normalised mean-pooled states of every layer."""
        fwd = self.start(texts, task)
        states = [mean_pool(fwd.hidden, fwd.attention_mask)]
        while fwd.layer < self.num_layers:
            fwd.advance()
            states.append(mean_pool(fwd.hidden, fwd.attention_mask))
        return torch.stack(states, dim=1)

    @torch.inference_mode()
    def finish(self, fwd: LayerwiseForward, exit_layers: torch.Tensor, task: TaskDefinition) -> torch.Tensor:
        """Run each current row of `fwd` up to its own exit layer and read the head there; rows leave the batch as
        they exit, so no row runs a layer past its exit. Returns logits (B0, C) indexed by the starting rows.

        exit_layers: (current batch,) ints in fwd.layer..L.
        """
        exits = exit_layers.to(self.device)
        if exits.numel() != fwd.hidden.shape[0]:
            raise InputError(f"{exits.numel()} exit layers for a batch of {fwd.hidden.shape[0]}")
        if exits.numel() and (int(exits.min()) < fwd.layer or int(exits.max()) > self.num_layers):
            raise InputError(f"exit layers must lie in {fwd.layer}..{self.num_layers}")
        out = torch.full((fwd.start_size, task.num_labels), float("nan"), device=self.device)
        while fwd.rows.numel():
            here = exits == fwd.layer
            if bool(here.any()):
                out[fwd.rows[here]] = self.label_logits(fwd, here, task).float()
                fwd.keep_rows(~here)
                exits = exits[~here]
                if not fwd.rows.numel():
                    break
            fwd.advance()
        return out


    @torch.inference_mode()
    def run_until(self, fwd: LayerwiseForward, task: TaskDefinition,
                  should_stop: Callable[[int, np.ndarray], np.ndarray]) -> tuple[torch.Tensor, np.ndarray]:
        """Read the head at every layer and let rows leave when should_stop(layer, logits (R, C)) -> (R,) bool says
        so (the last layer always stops): how head-reading policies run online. Returns (logits (B0, C),
        exit layers (B0,))."""
        out = torch.full((fwd.start_size, task.num_labels), float("nan"), device=self.device)
        exits = np.full(fwd.start_size, -1)
        everyone = torch.ones(fwd.hidden.shape[0], dtype=torch.bool, device=self.device)
        while True:
            logits = self.label_logits(fwd, everyone[:fwd.hidden.shape[0]], task)
            stop = np.asarray(should_stop(fwd.layer, logits.float().cpu().numpy()), dtype=bool)
            if fwd.layer == self.num_layers:
                stop[:] = True
            leaving = torch.from_numpy(stop).to(self.device)
            out[fwd.rows[leaving]] = logits[leaving].float()
            exits[fwd.rows[leaving].cpu().numpy()] = fwd.layer
            fwd.keep_rows(~leaving)
            if not fwd.rows.numel():
                return out, exits
            fwd.advance()


def mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """L2-normalised mean of the real tokens' states: (B, T, H), (B, T) -> (B, H)."""
    weights = attention_mask.unsqueeze(-1).to(hidden.dtype)
    pooled = (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1)
    return torch.nn.functional.normalize(pooled.float(), dim=-1)


def fingerprint_module(model: nn.Module) -> str:
    digest = hashlib.blake2b(digest_size=16)
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _model_max_tokens(model: nn.Module, tokenizer) -> int:
    limits = [getattr(model.config, name) for name in ("max_position_embeddings", "n_positions")
              if isinstance(getattr(model.config, name, None), int)]
    tokenizer_limit = getattr(tokenizer, "model_max_length", None)
    if isinstance(tokenizer_limit, int) and tokenizer_limit < 1_000_000:
        limits.append(tokenizer_limit)
    return min(limits) if limits else 512
