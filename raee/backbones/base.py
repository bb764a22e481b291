"""The backbone interface: label scores at every layer in one pass, and passes that stop at each row's exit layer.

A backbone is a model, its tokenizer and its family adapter, read one way (its *kind*). It takes prompts, not
tasks: a task gives its prompts and a head spec once (raee.tasks.Prompting), and `head(spec)` turns the spec into
what the kind reads (label token ids, verbalization prototypes), cached.
"""

from __future__ import annotations

import hashlib
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn

from raee.backbones.family import Family, adapter_for
from raee.backbones.layerwise import LayerwiseForward
from raee.errors import InputError
from raee.kinds import Kind
from raee.runtime import Precision, Runtime
from raee.tasks import HeadSpec

# The length limits (Backbone.refuses_unread, prefix_to_check, reads_whole), one rule for the engine, the build,
# evaluation and the server. A text longer than MAX_CHARS_PER_TOKEN characters per allowed token is refused before
# tokenizing (no tokenizer fits more into one token); one longer than PREFIX_CHARS_PER_TOKEN per allowed token has a
# prefix tokenized first, so that an over-long text costs the tokenizing of its prefix, not of all of it.
MAX_CHARS_PER_TOKEN = 32
PREFIX_CHARS_PER_TOKEN = 6
GROUP_ROWS = 8  # a batch is cut into groups of similar token length, each but the last at least this many rows ...
PADDING_ALLOWANCE = 0.25  # ... wherever a longer group would pad more than this share of its real tokens


@dataclass
class LayerPass:
    """What a full pass over a batch gives: label logits at every layer 0..L and, on request, pooled keys and the
    full vocabulary distribution's top-2 probabilities."""

    label_logits: np.ndarray  # (B, L+1, C) float32
    pooled: dict[int, np.ndarray]  # layer -> (B, H) L2-normalised mean-pooled hidden state
    vocab_top2: np.ndarray | None = None  # (B, L+1, 2) top-1 and top-2 probability over the whole vocabulary


@dataclass(frozen=True)
class Tokens:
    """A batch's prompts tokenized and checked once (`Backbone.tokens`): what `length_groups`, `encode`, `start`
    and `prefix_pass` take in place of the prompts, so that a batch cut into groups is not tokenized again for
    each group. Only the backbone that checked them takes them."""

    ids: list[list[int]]
    checked_by: "Backbone" = field(repr=False, compare=False)

    def __len__(self) -> int:
        return len(self.ids)

    def rows(self, rows: np.ndarray) -> "Tokens":
        return Tokens([self.ids[i] for i in rows], self.checked_by)


Batch = Sequence[str] | Tokens  # prompts, or their checked token ids


class Backbone(ABC):
    """A transformer used zero-shot: prompts in, a layer stack run layer by layer, label scores at any layer."""

    kind: ClassVar[Kind]
    add_special_tokens: ClassVar[bool] = True  # whether prompts are wrapped in the tokenizer's special tokens

    def __init__(self, model: nn.Module, tokenizer: Any, *, source: str, max_tokens: int | None = None,
                 family: Family | None = None, verify: bool = True) -> None:
        """verify: run the load-time self-check (raee.backbones.selfcheck), refusing an adapter that does not
        reproduce the model's own hidden states."""
        self.model = model.eval()
        self.family = family if family is not None else adapter_for(self.model)
        self.tokenizer = tokenizer
        self.tokenizer.padding_side = "right"  # positions of real tokens then match the unpadded row
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token or self.tokenizer.unk_token
        self.source = source
        self.max_tokens = max_tokens or _model_max_tokens(model, tokenizer)
        self._encoder = direct_encoder(tokenizer, self.add_special_tokens)
        self._fingerprint: str | None = None
        self._heads: dict[HeadSpec, Any] = {}
        self._heads_lock = threading.Lock()
        if verify:
            from raee.backbones.selfcheck import verify_backbone
            verify_backbone(self)

    # -- what each kind defines ------------------------------------------------------------------------------
    @abstractmethod
    def make_head(self, spec: HeadSpec) -> Any:
        """What label_logits reads for a head spec (label token ids, verbalization prototypes)."""

    @abstractmethod
    def label_logits(self, fwd: LayerwiseForward, rows: torch.Tensor, head: Any) -> torch.Tensor:
        """Label logits (len(rows), C) for the current rows `rows` (bool or index) of `fwd` at `fwd.layer`."""

    def answer_positions(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor | None:
        """Token position (B,) the head reads; by default the last real token."""
        return attention_mask.sum(dim=1) - 1

    def vocab_top2(self, fwd: LayerwiseForward) -> torch.Tensor | None:
        """(B, 2) top-1 and top-2 probability of the full vocabulary softmax at fwd.layer; None if the kind has
        no vocabulary head."""
        return None

    def settings(self) -> dict[str, Any]:
        """Settings that change the label scores; saved in the store manifest and checked on load."""
        return {}

    @property
    def mask_token(self) -> str | None:
        """The token a prompt's {mask} becomes (masked LMs only)."""
        return None

    def _check_prompt_ids(self, index: int, ids: list[int]) -> None:
        """Kind-specific checks of one tokenized prompt."""

    # -- shared machinery --------------------------------------------------------------------------------------
    @property
    def base(self) -> nn.Module:
        return self.family.base

    @property
    def layers(self) -> Sequence[nn.Module]:
        return self.family.layers

    @property
    def num_layers(self) -> int:
        return self.family.num_layers

    @property
    def hidden_size(self) -> int:
        """Width of the hidden states (and of prefix keys)."""
        config = self.family.config
        return int(getattr(config, "hidden_size", None) or config.d_model)

    @property
    def max_prefix_layer(self) -> int:
        """The deepest layer a prefix key may pool: one whose state covers the prompt's tokens."""
        return self.num_layers

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @property
    def runtime(self) -> Runtime:
        return self.family.runtime

    @property
    def precision(self) -> Precision:
        return self.family.precision

    def identity(self) -> dict[str, Any]:
        return {"source": self.source, "kind": self.kind, "family": self.family.name,
                "num_layers": self.num_layers, "fingerprint": self.fingerprint(),
                "dtype": str(self.dtype).removeprefix("torch."), "runtime": self.runtime,
                "precision": self.precision, "settings": self.settings()}

    def use_family(self, family: Family, verify: bool = True) -> None:
        """Run on another adapter of the same model (another runtime): self-checked again, heads made again."""
        self.family = family
        with self._heads_lock:
            self._heads.clear()
        if verify:
            from raee.backbones.selfcheck import verify_backbone
            verify_backbone(self)

    def fingerprint(self) -> str:
        """Hash of every weight (names, shapes, dtypes, bytes): ties a store to the exact weights it was built on."""
        if self._fingerprint is None:
            self._fingerprint = fingerprint_module(self.model)
        return self._fingerprint

    def head(self, spec: HeadSpec) -> Any:
        """The kind's reading of a head spec, made once per spec (before traffic, so requests never pay it)."""
        with self._heads_lock:
            if spec not in self._heads:
                self._heads[spec] = self.make_head(spec)
            return self._heads[spec]

    def check_texts(self, texts: Sequence[str], *, truncate: bool = False) -> None:
        """Raise InputError for an empty batch, an empty text or one too long to read; name the text's index.
        truncate: a long text is not refused here, as it will be cut to fit (raee.truncation)."""
        if isinstance(texts, (str, bytes)) or not isinstance(texts, (list, tuple)):
            raise InputError(f"texts must be a list of strings, got {type(texts).__name__}")
        if not texts:
            raise InputError("no texts given")
        for i, text in enumerate(texts):
            if not isinstance(text, str) or not text.strip():
                raise InputError(f"text {i} is empty")
            if self.refuses_unread(text) and not truncate:
                raise InputError(f"text {i} has {len(text)} characters, more than this backbone reads "
                                 f"({self.max_tokens} tokens)")

    # -- length limits -------------------------------------------------------------------------------------------
    @property
    def max_chars(self) -> int:
        """The character guard: a text longer than this is refused unread (never tokenized), since no tokenizer fits
        more than MAX_CHARS_PER_TOKEN characters into one token of the max_tokens this backbone reads."""
        return self.max_tokens * MAX_CHARS_PER_TOKEN

    def refuses_unread(self, text: str) -> bool:
        """Whether the character guard refuses `text` without tokenizing it."""
        return len(text) > self.max_chars

    def reads_whole(self, tokens: int) -> bool:
        """Whether a prompt of `tokens` tokens fits the tokens this backbone reads (the exact check)."""
        return tokens <= self.max_tokens

    def prefix_to_check(self, text: str) -> str | None:
        """A prefix of a long text to tokenize before the whole of it, or None for a text short enough to tokenize
        at once. The prefix ends at a space, so its words are words of the text and its tokens a part of the
        text's: a prefix over the limit (reads_whole false) means the text is over it."""
        reach = self.max_tokens * PREFIX_CHARS_PER_TOKEN
        cut = text.rfind(" ", 0, reach)
        return text[:cut] if len(text) > reach and cut > 0 else None

    def tokenize(self, prompts: Sequence[str]) -> list[list[int]]:
        """Token ids of each prompt, unpadded and untruncated. Every call uses the same tokenizer settings, so the
        fast tokenizer's shared state never changes and threads can tokenize at once without a lock. Where the
        tokenizer is the library's plain fast tokenizer, its Rust encoder is called directly (a copy of it, set up
        once, that nothing else changes): transformers' wrapping cost 40-90 us a call, a quarter of tokenizing a
        short prompt, and a served text is tokenized twice (admission, then its batch)."""
        if self._encoder is not None:
            return [encoding.ids for encoding in
                    self._encoder.encode_batch(list(prompts), add_special_tokens=self.add_special_tokens)]
        return self.tokenizer(list(prompts), add_special_tokens=self.add_special_tokens)["input_ids"]

    def token_counts(self, prompts: Sequence[str]) -> list[int]:
        return [len(ids) for ids in self.tokenize(prompts)]

    def length_groups(self, tokens: Tokens) -> list[np.ndarray]:
        """The batch's rows in groups of similar length to run apart (`length_groups`) on a CPU; a batch too small
        to cut, or on a GPU (where padded positions run in parallel, and each group would cost its own kernel
        launches; not measured here), is one group."""
        if len(tokens) <= GROUP_ROWS or self.device.type != "cpu":
            return [np.arange(len(tokens))]
        return length_groups([len(ids) for ids in tokens.ids])

    def token_spans(self, prompt: str) -> list[tuple[int, int]] | None:
        """The (start, end) characters of `prompt` behind each of its tokens, as `tokenize` makes them ((0, 0) for
        a special token); None from a tokenizer that cannot tell (a slow, pure-Python one). Offsets are read off
        the same encoding under the same settings, so this too needs no lock."""
        if not getattr(self.tokenizer, "is_fast", False):
            return None
        encoded = self.tokenizer([prompt], add_special_tokens=self.add_special_tokens, return_offsets_mapping=True)
        return [(int(start), int(end)) for start, end in encoded["offset_mapping"][0]]

    def check_prompts(self, prompts: Sequence[str]) -> list[list[int]]:
        """Raise InputError for a prompt that would fail in a batch: too many tokens, or a kind-specific fault
        (a masked-LM prompt without exactly one mask). Lets a server refuse it before it joins other requests.
        Returns the token ids."""
        encoded = self.tokenize(prompts)
        for i, ids in enumerate(encoded):
            if not self.reads_whole(len(ids)):
                raise InputError(f"text {i} is {len(ids)} tokens with its prompt; this backbone reads at most "
                                 f"{self.max_tokens}")
            self._check_prompt_ids(i, ids)
        return encoded

    def tokens(self, prompts: Sequence[str]) -> Tokens:
        """The prompts' token ids, checked (check_prompts), to hand to the calls below instead of the prompts."""
        return Tokens(self.check_prompts(prompts), self)

    def encode(self, prompts: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """(input_ids (B, T), attention_mask (B, T)) on the backbone's device, right-padded."""
        if isinstance(prompts, Tokens) and prompts.checked_by is not self:
            raise InputError("token ids checked by another backbone; tokenize the prompts with this one")
        encoded = prompts.ids if isinstance(prompts, Tokens) else self.check_prompts(prompts)
        width = max(len(ids) for ids in encoded)
        input_ids = np.full((len(encoded), width), self.tokenizer.pad_token_id, dtype=np.int64)
        mask = np.zeros((len(encoded), width), dtype=np.int64)
        for row, ids in enumerate(encoded):  # numpy: a torch op per row cost 10-20 us at batch 1
            input_ids[row, :len(ids)] = ids
            mask[row, :len(ids)] = 1
        device = self.device
        return torch.from_numpy(input_ids).to(device), torch.from_numpy(mask).to(device)

    @torch.inference_mode()
    def start(self, prompts: Batch) -> LayerwiseForward:
        """Embed a batch of prompts (layer 0); nothing of the layer stack has run yet."""
        if not prompts:
            raise InputError("no texts given")
        input_ids, mask = self.encode(prompts)
        return self._embedded(input_ids, mask, *self.family.begin(input_ids, mask))

    def _embedded(self, input_ids: torch.Tensor, mask: torch.Tensor, hidden: torch.Tensor, inputs: dict[str, Any],
                  carry: dict[str, Any]) -> LayerwiseForward:
        return LayerwiseForward(self.family, hidden, inputs, mask, self.answer_positions(input_ids, mask), carry)

    def prepare_prefix(self, depth: int) -> bool:
        """Ready the runtime's fastest prefix pass to layer `depth` (an onnxruntime backbone exports and checks one
        graph for the embeddings and layers 1..depth); whether there is one. Call it before traffic; `prefix_pass`
        works without it, layer by layer."""
        return self.family.prepare_prefix(self, depth)

    @torch.inference_mode()
    def prefix_pass(self, prompts: Batch,
                    depth: int) -> tuple[LayerwiseForward, list[LayerwiseForward], torch.Tensor]:
        """Run layers 1..depth for the whole batch: (its state at `depth`, its states at layers 0..depth, which the
        head can read later for rows that exit there (references, no copies), the prefix keys (B, H) pooled at
        `depth`)."""
        if not prompts:
            raise InputError("no texts given")
        input_ids, mask = self.encode(prompts)
        ran = self.family.run_prefix(input_ids, mask, depth)
        if ran is None:
            fwd = self._embedded(input_ids, mask, *self.family.begin(input_ids, mask))
        else:
            fwd = self._embedded(input_ids, mask, ran.states[0], ran.inputs, ran.carry)
        early = [fwd.snapshot()]
        while fwd.layer < depth:
            if ran is None:
                fwd.advance()
            else:
                fwd.hidden, fwd.layer = ran.states[fwd.layer + 1], fwd.layer + 1
            early.append(fwd.snapshot())
        return fwd, early, mean_pool(fwd.hidden, fwd.attention_mask) if ran is None else ran.keys

    @torch.inference_mode()
    def all_layers(self, prompts: Sequence[str], head: Any, pooled_layers: tuple[int, ...] = (),
                   with_vocab_top2: bool = False) -> LayerPass:
        """Label logits at every layer 0..L in one pass (for indexing), pooled states at `pooled_layers`, and
        with_vocab_top2 the full-vocabulary top-2 probabilities at every layer (LM kinds)."""
        fwd = self.start(prompts)
        everything = torch.ones(len(prompts), dtype=torch.bool, device=self.device)
        logits, pooled, top2 = [], {}, []
        while True:
            logits.append(self.label_logits(fwd, everything, head).float())
            if with_vocab_top2:
                top2.append(self.vocab_top2(fwd))
            if fwd.layer in pooled_layers:
                pooled[fwd.layer] = mean_pool(fwd.hidden, fwd.attention_mask).cpu().numpy()
            if fwd.layer == self.num_layers:
                break
            fwd.advance()
        vocab = (torch.stack(top2, dim=1).float().cpu().numpy()
                 if top2 and all(t is not None for t in top2) else None)
        return LayerPass(torch.stack(logits, dim=1).cpu().numpy(), pooled, vocab)

    @torch.inference_mode()
    def finish(self, fwd: LayerwiseForward, exit_layers: torch.Tensor, head: Any) -> torch.Tensor:
        """Run each current row of `fwd` up to its own exit layer and read the head there; rows leave the batch as
        they exit, so no row runs a layer past its exit. Returns logits (B0, C) indexed by the starting rows.

        exit_layers: (current batch,) ints in fwd.layer..L.
        """
        exits = exit_layers.to(self.device)
        if exits.numel() != fwd.hidden.shape[0]:
            raise InputError(f"{exits.numel()} exit layers for a batch of {fwd.hidden.shape[0]}")
        if exits.numel() and (int(exits.min()) < fwd.layer or int(exits.max()) > self.num_layers):
            raise InputError(f"exit layers must lie in {fwd.layer}..{self.num_layers}")
        out: torch.Tensor | None = None
        while fwd.rows.numel():
            here = exits == fwd.layer
            if bool(here.any()):
                logits = self.label_logits(fwd, here, head).float()
                if out is None:
                    out = torch.full((fwd.start_size, logits.shape[1]), float("nan"), device=self.device)
                out[fwd.rows[here]] = logits
                fwd.keep_rows(~here)
                exits = exits[~here]
                if not fwd.rows.numel():
                    break
            fwd.advance()
        if out is None:
            raise InputError("no rows to finish")
        return out

    @torch.inference_mode()
    def run_until(self, fwd: LayerwiseForward, head: Any,
                  should_stop: Callable[[int, np.ndarray], np.ndarray]) -> tuple[torch.Tensor, np.ndarray]:
        """Read the head at every layer and let rows leave when should_stop(layer, logits (R, C)) -> (R,) bool says
        so (the last layer always stops): how head-reading policies run online. Returns (logits (B0, C),
        exit layers (B0,))."""
        out: torch.Tensor | None = None
        exits = np.full(fwd.start_size, -1)
        while True:
            everyone = torch.ones(fwd.hidden.shape[0], dtype=torch.bool, device=self.device)
            logits = self.label_logits(fwd, everyone, head).float()
            if out is None:
                out = torch.full((fwd.start_size, logits.shape[1]), float("nan"), device=self.device)
            stop = np.asarray(should_stop(fwd.layer, logits.cpu().numpy()), dtype=bool)
            if fwd.layer == self.num_layers:
                stop[:] = True
            leaving = torch.from_numpy(stop).to(self.device)
            out[fwd.rows[leaving]] = logits[leaving]
            exits[fwd.rows[leaving].cpu().numpy()] = fwd.layer
            fwd.keep_rows(~leaving)
            if not fwd.rows.numel():
                return out, exits
            fwd.advance()


def length_groups(token_counts: list[int], min_rows: int = GROUP_ROWS,
                  allowance: float = PADDING_ALLOWANCE) -> list[np.ndarray]:
    """Row indexes of a batch in groups of similar length, shortest first: a group closes once it holds min_rows
    rows and the next (longer) row would make its padded tokens exceed (1 + allowance) times its real ones; the last
    group holds the rows left, however few (a lone long row costs a call per layer, not 8 rows padded). A padded
    batch runs every row at its longest row's width; on 2 CPU cores batches of 32 cr reviews pad 2.5 tokens for
    every real one, and cr's served policy ran 272 texts/s on them whole against 429 in these groups
    (docs/PERFORMANCE.md). A batch of at most min_rows rows is one group, in its own order."""
    if len(token_counts) <= min_rows:
        return [np.arange(len(token_counts))]
    order = np.argsort(np.asarray(token_counts), kind="stable")
    groups: list[np.ndarray] = []
    current: list[int] = []
    real = 0
    for row in order:
        width = token_counts[row]  # the longest so far: rows come shortest first
        if len(current) >= min_rows and (len(current) + 1) * width > (1 + allowance) * (real + width):
            groups.append(np.array(current))
            current, real = [], 0
        current.append(int(row))
        real += width
    groups.append(np.array(current))
    return groups


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


def _model_max_tokens(model: nn.Module, tokenizer: Any) -> int:
    limits = [getattr(model.config, name) for name in ("max_position_embeddings", "n_positions")
              if isinstance(getattr(model.config, name, None), int)]
    tokenizer_limit = getattr(tokenizer, "model_max_length", None)
    if isinstance(tokenizer_limit, int) and tokenizer_limit < 1_000_000:
        limits.append(tokenizer_limit)
    return min(limits) if limits else 512


# Methods on transformers' fast tokenizer between a call and its Rust encoder: a tokenizer class that overrides one
# may tokenize differently, so it keeps the library's own path (Backbone.tokenize).
_FAST_CALL_PATH = ("__call__", "_call_one", "encode_plus", "batch_encode_plus", "_encode_plus", "_batch_encode_plus",
                   "set_truncation_and_padding", "tokenize", "_tokenize")
# Strings the direct encoder must tokenize exactly as the tokenizer's own call before it is used.
_ENCODER_PROBES = ("It was great.", "  spaced   out\ttabs\nand lines ", "naïve café, 東京 and emoji 🙂",
                   "UPPER lower MiXeD 12345 3.14 e-mail@x.org", "a" * 300, "'quotes' \"double\" (paren) [br] {c}")


def direct_encoder(tokenizer: Any, add_special_tokens: bool) -> Any | None:
    """A private copy of a fast tokenizer's Rust encoder, set up as every Backbone.tokenize call sets the tokenizer
    (no padding, no truncation), or None where that would not give the same ids: a slow tokenizer, a class that
    changes the call path, or any probe (these strings and the special tokens) tokenized differently. The copy is
    made when the backbone is: a tokenizer changed after that (added tokens, special-token settings) is not seen by
    it, and raee never changes one."""
    import copy

    import transformers

    base = getattr(transformers, "PreTrainedTokenizerFast", None)
    backend = getattr(tokenizer, "_tokenizer", None)
    if not getattr(tokenizer, "is_fast", False) or base is None or backend is None or not isinstance(tokenizer, base):
        return None
    if any(getattr(type(tokenizer), name, None) is not getattr(base, name, None) for name in _FAST_CALL_PATH):
        return None
    try:
        encoder = copy.deepcopy(backend)
        encoder.no_padding()
        encoder.no_truncation()
        encoder.encode_special_tokens = bool(getattr(tokenizer, "split_special_tokens", False))
        probes = [*_ENCODER_PROBES, " ".join(str(t) for t in tokenizer.all_special_tokens) + " after"]
        direct = [e.ids for e in encoder.encode_batch(probes, add_special_tokens=add_special_tokens)]
        own = tokenizer(probes, add_special_tokens=add_special_tokens)["input_ids"]
    except Exception:  # anything unexpected: the library's path, which every caller already handles
        return None
    return encoder if direct == own else None
