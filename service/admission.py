"""Admitting one classify call: checks in order of cost, so that refusals are cheap, then the batcher.

    1 ready and not draining; the task is served                      (dict lookups)
    2 text count, bytes and characters within limits; valid options     (no tokenizing)
    3 the deadline can be met given the work ahead, each text costed   (arithmetic)
      at its prompt's tokens alone
    4 room in the queue, reserved: it counts from here until answered   (one lock, microseconds; a full queue
      makes room for a lighter client by pushing out the heaviest one's newest requests)
    5 every text tokenizes within the backbone's limits                 (off the event loop; stops at a bad text)
      or, when the request asks to truncate, is first cut to fit        (a bounded prefix of each text tokenized)
    6 the deadline again, at the texts' own tokens, unless step 4      (arithmetic)
      pushed another request out (refusing now would waste its room)
    7 the batcher, awaited; a caller that goes away takes its texts out of the queue
A refused request never reaches step 5 unless it is well-formed and has room, so floods of excess texts cost the
server little beyond gRPC's own cost per call (about half a millisecond of CPU here), and an over-long text costs
the tokenizing of its prefix.
"""

from __future__ import annotations

import asyncio
import dataclasses
import re
import time
from concurrent.futures import Executor

from raee.engine import Engine
from raee.errors import InputError
from service.batcher import BatchKey, BatchOutcome, MicroBatcher
from service.config import ServerConfig
from service.convert import ClassifyCall
from service.errors import DeadlineExpired, Draining, NotReady
from service.registry import StoreRegistry

# Texts tokenized together while validating: the first text alone, so that a request of over-long texts is refused
# after tokenizing one, then growing groups.
VALIDATION_GROUPS = (1, 3, 12)


class Admission:
    def __init__(self, config: ServerConfig, executor: Executor) -> None:
        self.config = config
        self.executor = executor  # tokenizes requests off the event loop, apart from the batcher
        self.registry: StoreRegistry | None = None
        self.batcher: MicroBatcher | None = None
        self.draining = False

    def ready(self, registry: StoreRegistry, batcher: MicroBatcher) -> None:
        self.registry, self.batcher = registry, batcher

    def check_open(self) -> tuple[StoreRegistry, MicroBatcher]:
        """The registry and batcher of a server that is ready and not draining; Draining or NotReady otherwise."""
        if self.draining:
            raise Draining("the server is shutting down; retry on another replica")
        if self.registry is None or self.batcher is None:
            raise NotReady("the server is still loading its backbone and stores; retry shortly")
        return self.registry, self.batcher

    async def classify(self, call: ClassifyCall, client: str, deadline: float | None) -> BatchOutcome:
        """Admit, validate and batch one call; deadline is a time.monotonic() value or None."""
        registry, batcher = self.check_open()
        engine = registry.get(call.task)
        self._check_bounds(call, engine)
        key = self._batch_key(call, engine)
        self._check_deadline(deadline, batcher, [engine.least_tokens] * len(call.texts))
        reservation = batcher.reserve(len(call.texts), client)
        try:
            texts, cut, tokens = await asyncio.get_running_loop().run_in_executor(
                self.executor, admitted_texts, engine, call.texts, call.truncate)
            if not reservation.pushed_out:
                self._check_deadline(deadline, batcher, tokens)
            pending = batcher.submit(reservation, key, engine, texts, deadline, tokens)
        except BaseException:
            batcher.release(reservation)
            raise
        try:
            outcome = await asyncio.wrap_future(pending.future)
        except asyncio.CancelledError:
            batcher.cancel(pending)
            raise
        if not any(cut):
            return outcome
        return dataclasses.replace(outcome, results=[dataclasses.replace(r, truncated=c)
                                                     for r, c in zip(outcome.results, cut)])

    def _check_bounds(self, call: ClassifyCall, engine: Engine) -> None:
        limit = self.config.max_text_bytes
        if len(call.texts) > self.config.max_texts:
            raise InputError(f"{len(call.texts)} texts in one request; the limit is {self.config.max_texts}")
        for i, text in enumerate(call.texts):
            if len(text) > limit or len(text.encode("utf-8")) > limit:  # a character is at least one byte
                raise InputError(f"text {i} is {len(text.encode('utf-8'))} bytes; the limit is {limit}")
        engine.backbone.check_texts(call.texts, truncate=call.truncate)  # empty; characters past what it reads

    def _batch_key(self, call: ClassifyCall, engine: Engine) -> BatchKey:
        engine.resolve(call.policy)  # the engine's own rules: static:L within the layers, k within range
        return BatchKey(call.task, call.policy, call.neighbours)

    def _check_deadline(self, deadline: float | None, batcher: MicroBatcher, tokens: list[int]) -> None:
        """DeadlineExpired if the deadline has passed, or if the batcher's low estimate of the work says it cannot be
        met for texts of these tokens each."""
        if deadline is None:
            return
        left = deadline - time.monotonic()
        needed = batcher.estimated_seconds(tokens)
        if left <= 0 or (needed is not None and needed > left):
            raise DeadlineExpired(f"the deadline ({max(left, 0) * 1e3:.0f} ms left) cannot be met: about "
                                  f"{(needed or 0) * 1e3:.0f} ms of work is ahead of this request; allow more time "
                                  "or retry later")


def admitted_texts(engine: Engine, texts: list[str], truncate: bool) -> tuple[list[str], list[bool], list[int]]:
    """The texts as the batcher will get them, which were cut, and each one's tokens with its prompt: with truncate
    each is first cut to the backbone's token limit (raee.truncation, which tokenizes a bounded prefix of each,
    however long), then all are validated."""
    cut = [False] * len(texts)
    if truncate:
        texts, cut = engine.fit(texts)
    return texts, cut, validate_prompts(engine, texts)


def validate_prompts(engine: Engine, texts: list[str]) -> list[int]:
    """Tokenize the texts with their prompts and refuse any the backbone cannot read whole (InputError naming the
    text by its index in the request); each text's tokens. Stops at the first group holding a bad text."""
    for i, text in enumerate(texts):
        engine.check_prefix(i, text)  # a long text's prefix first: raee.backbones.base's length limits
    start, tokens = 0, []
    for size in (*VALIDATION_GROUPS, len(texts)):
        group = texts[start:start + size]
        if not group:
            break
        try:
            tokens += engine.check_texts(group)
        except InputError as exc:
            raise InputError(_renumbered(str(exc), start)) from None
        start += len(group)
    return tokens


def _renumbered(message: str, offset: int) -> str:
    """The backbone names a text by its index in the group it was given ("text 0 ..."); name it in the request."""
    return re.sub(r"^text (\d+)", lambda m: f"text {int(m.group(1)) + offset}", message)
