"""Dynamic micro-batching: a bounded queue, batches formed up to a size or a wait, one backbone worker.

Requests with the same task and options are batched together; their rows travel through the backbone as one batch
and leave at their own exit layers. Work whose deadline has passed is dropped before any compute.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass, field

from raee.engine import Classification, Engine
from raee.errors import RaeeError
from raee.exit_policy import ExitPolicy

log = logging.getLogger(__name__)


class QueueFull(RaeeError):
    """The batching queue holds as many texts as allowed."""


class DeadlineExpired(RaeeError):
    """The request's deadline passed before its batch ran."""


class Draining(RaeeError):
    """The server is shutting down and takes no new work."""


@dataclass(frozen=True)
class BatchKey:
    """Requests that may share a backbone batch."""

    task: str
    policy: ExitPolicy
    neighbours: bool


@dataclass
class Pending:
    key: BatchKey
    texts: list[str]
    deadline: float | None  # time.monotonic() by which the answer is useless
    future: Future = field(default_factory=Future)
    enqueued: float = field(default_factory=time.monotonic)


@dataclass(frozen=True)
class BatchOutcome:
    results: list[Classification]
    store_version: str
    queue_ms: float


class MicroBatcher:
    def __init__(self, engine_for, max_batch: int, max_wait_ms: float, max_queue: int, metrics=None) -> None:
        """engine_for(task) -> Engine, looked up when a batch runs (so a reload takes effect between batches)."""
        self.engine_for = engine_for
        self.max_batch, self.max_wait, self.max_queue = max_batch, max_wait_ms / 1000.0, max_queue
        self.metrics = metrics
        self._queue: deque[Pending] = deque()
        self._queued_texts = 0
        self._cond = threading.Condition()
        self._closing = False
        self._busy = False
        self._worker = threading.Thread(target=self._run, name="raee-batcher", daemon=True)
        self._worker.start()

    def submit(self, key: BatchKey, texts: list[str], deadline: float | None) -> Future:
        pending = Pending(key, texts, deadline)
        with self._cond:
            if self._closing:
                raise Draining("the server is shutting down")
            if self._queued_texts + len(texts) > self.max_queue:
                raise QueueFull(f"queue full ({self._queued_texts} texts waiting, limit {self.max_queue}); "
                                "retry with backoff")
            self._queue.append(pending)
            self._queued_texts += len(texts)
            self._set_depth()
            self._cond.notify()
        return pending.future

    def check_room(self, texts: int) -> None:
        """Raise QueueFull now if `texts` more would not fit: lets a server refuse before validating a request."""
        if self._queued_texts + texts > self.max_queue:  # a racy read is fine: submit() checks again under the lock
            raise QueueFull(f"queue full ({self._queued_texts} texts waiting, limit {self.max_queue}); retry with "
                            "backoff")

    def close(self, timeout: float | None = None) -> bool:
        """Refuse new work, finish what is queued; True if the worker finished in time."""
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        self._worker.join(timeout)
        return not self._worker.is_alive()

    @property
    def idle(self) -> bool:
        with self._cond:
            return not self._queue and not self._busy

    def _set_depth(self) -> None:
        if self.metrics:
            self.metrics.queue_depth.set(self._queued_texts)

    def _take_batch(self) -> list[Pending] | None:
        """Block for the first request, then gather same-key requests up to max_batch rows or max_wait."""
        with self._cond:
            while not self._queue:
                if self._closing:
                    return None
                self._cond.wait()
            first = self._queue.popleft()
            batch, rows = [first], len(first.texts)
            until = time.monotonic() + self.max_wait
            while rows < self.max_batch:
                match = next((p for p in self._queue if p.key == first.key and rows + len(p.texts) <= self.max_batch),
                             None)
                if match is not None:
                    self._queue.remove(match)
                    batch.append(match)
                    rows += len(match.texts)
                    continue
                remaining = until - time.monotonic()
                if remaining <= 0 or self._closing:
                    break
                self._cond.wait(remaining)
            self._queued_texts -= rows
            self._set_depth()
            self._busy = True
            return batch

    def _run(self) -> None:
        while True:
            batch = self._take_batch()
            if batch is None:
                return
            try:
                self._process(batch)
            except Exception:  # never let the worker die: fail the batch, keep serving
                log.exception("batch failed")
                for p in batch:
                    if not p.future.done():
                        p.future.set_exception(RuntimeError("internal error while classifying"))
            finally:
                with self._cond:
                    self._busy = False

    def _process(self, batch: list[Pending]) -> None:
        now = time.monotonic()
        live = []
        for p in batch:
            if not p.future.set_running_or_notify_cancel():
                continue  # the caller gave up (its deadline passed) and cancelled it
            if p.deadline is not None and now >= p.deadline:
                p.future.set_exception(DeadlineExpired("the deadline passed while the request waited in the queue"))
            else:
                live.append(p)
        if not live:
            return
        key = live[0].key
        engine: Engine = self.engine_for(key.task)
        texts = [t for p in live for t in p.texts]
        if self.metrics:
            self.metrics.batch_size.observe(len(texts))
        try:
            results = engine.classify(texts, policy=key.policy, with_neighbours=key.neighbours)
        except RaeeError as exc:
            if len(live) == 1:
                live[0].future.set_exception(exc)
                return
            # One request's bad input must not fail the others: run each alone.
            for p in live:
                self._run_alone(engine, p, now)
            return
        start = 0
        for p in live:
            _answer(p, engine, results[start:start + len(p.texts)], now)
            start += len(p.texts)

    def _run_alone(self, engine: Engine, p: Pending, now: float) -> None:
        try:
            _answer(p, engine, engine.classify(p.texts, policy=p.key.policy, with_neighbours=p.key.neighbours),
                    now)
        except RaeeError as exc:
            p.future.set_exception(exc)


def _answer(p: Pending, engine: Engine, results: list[Classification], batch_started: float) -> None:
    p.future.set_result(BatchOutcome(results, engine.store.version, (batch_started - p.enqueued) * 1e3))
