"""Dynamic micro-batching with admission control and fair shares between clients.

Admission: `reserve(n)` counts a request's texts from the moment it is admitted (before any tokenizing) until each is
answered, so max_queue bounds the real backlog and a refusal costs microseconds. When the queue is full, a client
holding less of it than the heaviest one pushes out the heaviest one's newest queued requests (which get
RESOURCE_EXHAUSTED) instead of being refused itself: a flood fills the queue, but cannot keep others out of it.
Scheduling: a batch takes texts first from the clients (connections) holding the fewest texts in the queue, and
among equals from those with the smallest virtual time, which grows by one per text scheduled (start-time fair
queuing). A batch started for a light client takes no rows from clients holding far more (HEAVY_FACTOR), so it
runs short; with max_batch_ms, while light clients are about (one sent within LIGHT_MEMORY_S), batches shrink to
about that long, since a light client's request may arrive during any of them. So a client sending a few texts at a
time waits about one short batch whatever floods others send, clients sending alike share alike, and a load of
large requests alone runs in full batches. A forming batch waits at most max_wait for more texts, and not at all once
every client heard from in the last second (RECENT_CLIENT_S) is in it. A request larger than max_batch is split
across batches; its rows leave the backbone at their own exit layers. Work whose deadline has passed is dropped
before any compute; a cancelled request's queued texts leave the queue at once.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from raee.engine import Classification, Engine
from raee.errors import RaeeError
from raee.exit_policy import ExitPolicy
from service.errors import DeadlineExpired, Draining, QueueFull

if TYPE_CHECKING:
    from service.metrics import ServerMetrics

log = logging.getLogger(__name__)

MAX_IDLE_CLIENTS = 4096  # fair-share records kept for clients with nothing queued
SMOOTHING = 0.2  # weight of the newest batch in the row time that max_batch_ms cuts batches by
COST_WINDOW = 64  # recent batches whose cheapest cost per row and per token make the low estimate of a wait
MIN_BATCH_SHARE = 4  # max_batch_ms never shrinks batches below max_batch / this: throughput stays within reach
HEAVY_FACTOR = 4  # a batch takes no rows from clients holding more than this times what its first client holds
LIGHT_MEMORY_S = 5.0  # max_batch_ms applies while a light client (holding a shortest batch or less) sent this recently
RECENT_CLIENT_S = 1.0  # a client that sent within this long may send again soon: a forming batch waits for it


@dataclass(frozen=True)
class BatchKey:
    """Requests that may share a backbone batch."""

    task: str
    policy: ExitPolicy
    neighbours: bool


BatchIdentity = tuple[BatchKey, int]  # (key, id(engine)): rows that may run in one backbone batch


@dataclass(frozen=True)
class BatchOutcome:
    results: list[Classification]
    store_version: str
    queue_ms: float  # from admission to the start of the request's first batch


class Reservation:
    """Room for `texts` texts in the queue, taken at admission and given back as they are answered."""

    def __init__(self, texts: int, client: str, pushed_out: int = 0) -> None:
        self.texts, self.client = texts, client
        self.held = texts  # not yet answered or released
        self.pushed_out = pushed_out  # other requests refused to make this room


@dataclass(eq=False)
class Pending:
    """One admitted request: its texts, where it stands, and the future its caller awaits."""

    key: BatchKey
    engine: Engine  # pinned at admission: a reload between batches does not mix store versions in one answer
    texts: list[str]
    tokens: list[int]  # each text's tokens with its prompt (counted at admission)
    deadline: float | None  # time.monotonic() by which the answer is useless
    client: str
    reservation: Reservation
    admitted: float
    future: Future[BatchOutcome] = field(default_factory=Future)
    results: list[Classification | None] = field(default_factory=list)  # per text, None until answered
    next_row: int = 0  # rows handed to batches so far
    started: float | None = None  # when its first batch started
    failed: bool = False

    def __post_init__(self) -> None:
        self.results = [None] * len(self.texts)
        self.future.set_running_or_notify_cancel()  # only the batcher settles it; a caller cancels via the batcher


@dataclass(eq=False)
class _Client:
    vtime: float = 0.0  # virtual time: texts scheduled for this client, in the shared clock
    queue: deque[Pending] = field(default_factory=deque)


class MicroBatcher:
    def __init__(self, max_batch: int, max_wait_ms: float, max_queue: int, metrics: ServerMetrics | None = None,
                 max_batch_ms: float = 0.0, wait_for_new_clients: bool = False) -> None:
        """max_batch_ms: when set, while light clients are about, batches hold at most as many rows as recent batches
        ran in that time, so that a batch, and so the wait of a client that sends a text now and then, stays about
        that long. wait_for_new_clients: a forming batch waits the whole max_wait even when every client that sent
        within RECENT_CLIENT_S is already in it (by default it runs then: a lone client's request does not wait for
        company that is not coming, and clients sending back to back start their next batch once all are in)."""
        self.max_batch, self.max_wait, self.max_queue = max_batch, max_wait_ms / 1000.0, max_queue
        self.wait_for_new_clients = wait_for_new_clients
        self._last_sent: dict[str, float] = {}  # client -> when it last submitted (time.monotonic())
        self.max_batch_seconds = max_batch_ms / 1000.0
        self.metrics = metrics
        self._clients: dict[str, _Client] = {}
        self._vtime = 0.0  # virtual start time of the last text scheduled
        self._backlog = 0  # texts admitted and not yet answered
        self._held_by: dict[str, int] = {}  # the same, per client
        self._light_seen = -math.inf  # when a light client last sent (time.monotonic())
        self._row_seconds: float | None = None  # smoothed time per row, within a batch
        self._costs: deque[tuple[float, float]] = deque(maxlen=COST_WINDOW)  # recent (s per row, s per token)
        self._cheapest: tuple[float, float] | None = None  # the least of each over _costs
        self._running = (0, 0)  # rows and tokens of the batch running
        self._cond = threading.Condition()
        self._closing = False
        self._busy = False
        self._worker = threading.Thread(target=self._run, name="raee-batcher", daemon=True)
        self._worker.start()

    # -- admission ----------------------------------------------------------------------------------------------
    def reserve(self, texts: int, client: str = "") -> Reservation:
        """Room for `texts` more texts from `client`, or QueueFull / Draining at once."""
        with self._cond:
            if self._closing:
                raise Draining("the server is shutting down; retry on another replica")
            pushed_out = self._push_out(texts, client) if self._backlog + texts > self.max_queue else 0
            if self._backlog + texts > self.max_queue:
                raise QueueFull(f"queue full: {self._backlog} texts admitted and not yet answered, {texts} more would "
                                f"pass the limit of {self.max_queue}; retry with backoff")
            self._backlog += texts
            self._held_by[client] = self._held_by.get(client, 0) + texts
            self._set_depth()
            return Reservation(texts, client, pushed_out)

    def _push_out(self, texts: int, client: str) -> int:
        """Make room for a lighter client by refusing the newest not-yet-started requests of the heaviest clients
        (those holding more of the queue than this one would); how many were refused."""
        mine, refused = self._held_by.get(client, 0) + texts, 0
        while self._backlog + texts > self.max_queue:
            victims = [(self._held_by.get(name, 0), p) for name, queued in self._clients.items() if name != client
                       for p in reversed(queued.queue) if p.next_row == 0 and not p.failed]
            victims = [(held, p) for held, p in victims if held > mine]
            if not victims:
                return refused
            held, victim = max(victims, key=lambda v: v[0])
            self._fail(victim, QueueFull(f"pushed out of a full queue by a client holding less of it than yours "
                                         f"({held} texts); retry with backoff"))
            refused += 1
        return refused

    def release(self, reservation: Reservation) -> None:
        """Give back what a reservation still holds (the request was refused after admission). Idempotent."""
        with self._cond:
            self._give_back(reservation, reservation.held)

    def submit(self, reservation: Reservation, key: BatchKey, engine: Engine, texts: list[str],
               deadline: float | None, tokens: list[int]) -> Pending:
        """Queue a request within its reservation; await `pending.future` for a BatchOutcome. tokens: each text's
        tokens with its prompt, which the wait estimate (estimated_seconds) is made of."""
        if not len(texts) == len(tokens) == reservation.held:
            raise ValueError(f"{len(texts)} texts and {len(tokens)} token counts submitted on a reservation "
                             f"holding {reservation.held}")
        client = reservation.client
        pending = Pending(key, engine, texts, tokens, deadline, client, reservation, time.monotonic())
        with self._cond:
            if self._closing:
                self._give_back(reservation, reservation.held)
                raise Draining("the server is shutting down; retry on another replica")
            queue_of = self._clients.get(client)
            if queue_of is None:
                queue_of = self._clients[client] = _Client()
            if not queue_of.queue:
                queue_of.vtime = max(queue_of.vtime, self._vtime)  # no credit for time spent idle
            if self._held_by.get(client, 0) <= self._shortest_batch():
                self._light_seen = time.monotonic()
            if not self.wait_for_new_clients:
                self._last_sent[client] = pending.admitted
            queue_of.queue.append(pending)
            self._cond.notify()
        return pending

    def cancel(self, pending: Pending) -> None:
        """The caller went away: its texts not yet in a batch leave the queue now."""
        with self._cond:
            if not pending.future.done():
                self._fail(pending, DeadlineExpired("the call was cancelled"))

    def estimated_seconds(self, tokens: list[int]) -> float | None:
        """A low estimate of the time to answer more texts of these tokens each (prompt included): the batch in
        progress (if any), then these texts, costed at the lesser of the recent batches' least cost per row times
        their number and least cost per token times their tokens. The least, not an average, and both: a client
        whose batches are slow per row (long texts, or one text per batch) cannot make the server refuse others'
        deadlines, as its cost per token stays low, and one whose batches are cheap per token cannot have it
        accept hopeless ones, as tokens are what the backbone runs (early exit aside: texts that leave early cost
        less per token, at most by the layers they skip). None before any batch has run."""
        cheapest, running = self._cheapest, self._running  # read once: the worker thread replaces them
        if cheapest is None:
            return None

        def low(rows: int, tokens: int) -> float:
            return min(rows * cheapest[0], tokens * cheapest[1])
        return (low(*running) if self._busy else 0.0) + low(len(tokens), sum(tokens))

    def _batch_rows(self) -> int:
        """Most rows in the next batch: max_batch, or fewer (down to a quarter of it) when light clients are about
        and max_batch_ms says batches run too long."""
        if (not self.max_batch_seconds or self._row_seconds is None
                or time.monotonic() - self._light_seen > LIGHT_MEMORY_S):
            return self.max_batch
        fitting = int(self.max_batch_seconds / self._row_seconds)
        return max(self._shortest_batch(), min(self.max_batch, fitting))

    def _shortest_batch(self) -> int:
        """The fewest rows max_batch_ms shrinks a batch to; a client holding no more than this is light."""
        return max(1, self.max_batch // MIN_BATCH_SHARE)

    @property
    def backlog(self) -> int:
        return self._backlog

    @property
    def idle(self) -> bool:
        with self._cond:
            return self._backlog == 0 and not self._busy

    def close(self, timeout: float | None = None) -> bool:
        """Refuse new work, finish what is queued; True if the worker finished in time."""
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        self._worker.join(timeout)
        return not self._worker.is_alive()

    # -- scheduling (under self._cond) ----------------------------------------------------------------------------
    def _give_back(self, reservation: Reservation, texts: int) -> None:
        texts = min(texts, reservation.held)
        reservation.held -= texts
        self._backlog -= texts
        held = self._held_by.get(reservation.client, 0) - texts
        if held > 0:
            self._held_by[reservation.client] = held
        else:
            self._held_by.pop(reservation.client, None)
        self._set_depth()

    def _fail(self, pending: Pending, error: BaseException) -> None:
        """Settle a request with an error; its unscheduled rows leave the backlog (rows in a running batch leave
        when that batch ends)."""
        pending.failed = True
        self._give_back(pending.reservation, len(pending.texts) - pending.next_row)
        pending.next_row = len(pending.texts)
        if not pending.future.done():
            pending.future.set_exception(error)

    def _set_depth(self) -> None:
        if self.metrics:
            self.metrics.queue_depth.set(self._backlog)

    def _head(self, client: _Client, now: float) -> Pending | None:
        """The client's first request with rows left to schedule; requests dead meanwhile are settled and dropped."""
        while client.queue:
            p = client.queue[0]
            if p.deadline is not None and now >= p.deadline and not p.failed:
                self._fail(p, DeadlineExpired("the deadline passed while the request waited in the queue"))
            if p.next_row < len(p.texts) and not p.failed:
                return p
            client.queue.popleft()
        return None

    def _next_rows(self, batch_key: BatchIdentity | None, room: int, now: float,
                   max_held: float = math.inf) -> tuple[Pending, int] | None:
        """(request, rows) to add to the batch, from the matching client that holds the fewest texts in the queue,
        and among equals the one with the smallest virtual time: as many rows as keep it no further ahead than the
        next such client. Clients holding more than max_held are passed over. None when nothing matches."""
        ranked = []
        for name, client in self._clients.items():
            p = self._head(client, now)
            held = self._held_by.get(name, 0)
            if p is not None and held <= max_held and (batch_key is None or (p.key, id(p.engine)) == batch_key):
                ranked.append((held, client.vtime, client, p))
        if not ranked:
            return None
        ranked.sort(key=lambda r: r[:2])
        held, vtime, client, p = ranked[0]
        share = room
        if len(ranked) > 1 and ranked[1][0] == held:
            share = int(ranked[1][1] - vtime) + 1
        rows = max(1, min(share, room, len(p.texts) - p.next_row))
        self._vtime = vtime
        client.vtime += rows
        return p, rows

    def _take_batch(self) -> list[tuple[Pending, range]] | None:
        """Block for work, then gather rows of one key up to max_batch or max_wait, fairly across clients."""
        with self._cond:
            while True:
                batch: list[tuple[Pending, range]] = []
                batch_key: BatchIdentity | None = None
                size, until, limit, max_held = 0, math.inf, self._batch_rows(), math.inf
                while size < limit:
                    now = time.monotonic()
                    picked = self._next_rows(batch_key, limit - size, now, max_held)
                    if picked is None:
                        if not batch:
                            break
                        if now >= until or self._closing or self._all_recent_clients_in(batch, now):
                            break
                        self._cond.wait(until - now)
                        continue
                    p, rows = picked
                    batch.append((p, range(p.next_row, p.next_row + rows)))
                    p.next_row += rows
                    p.started = p.started or now
                    size += rows
                    if batch_key is None:  # the first rows: light clients' rows run without heavy ones slowing
                        batch_key = (p.key, id(p.engine))  # their batch, and the batch waits max_wait for more
                        max_held = HEAVY_FACTOR * max(1, self._held_by.get(p.client, 0))
                        until = now + self.max_wait
                if batch:
                    self._busy = True
                    self._forget_idle_clients()
                    return batch
                if self._closing:
                    return None
                self._cond.wait()

    def _all_recent_clients_in(self, batch: list[tuple[Pending, range]], now: float) -> bool:
        """Whether every client that sent within RECENT_CLIENT_S has rows in the forming batch, so that waiting
        longer could only catch a client not heard from lately (never, with wait_for_new_clients). Clients not heard
        from in that time are forgotten once per batch (_forget_idle_clients)."""
        if self.wait_for_new_clients:
            return False
        present = {p.client for p, _ in batch}
        return all(client in present or now - sent > RECENT_CLIENT_S for client, sent in self._last_sent.items())

    def _forget_idle_clients(self) -> None:
        now = time.monotonic()
        self._last_sent = {c: sent for c, sent in self._last_sent.items() if now - sent <= RECENT_CLIENT_S}
        if len(self._clients) > MAX_IDLE_CLIENTS:
            self._clients = {c: s for c, s in self._clients.items() if s.queue}
        else:
            for name in [c for c, s in self._clients.items() if not s.queue and s.vtime <= self._vtime]:
                del self._clients[name]

    # -- running batches ------------------------------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            batch = self._take_batch()
            if batch is None:
                return
            try:
                self._process(batch)
            except Exception:  # never let the worker die: fail the batch, keep serving
                log.exception("batch failed")
                with self._cond:
                    for p, rows in batch:
                        self._give_back(p.reservation, len(rows))
                        self._fail(p, RuntimeError("internal error while classifying"))
            finally:
                with self._cond:
                    self._busy = False

    def _live(self, batch: list[tuple[Pending, range]]) -> list[tuple[Pending, range]]:
        """The batch less rows of requests that were cancelled or expired while it formed."""
        now, live = time.monotonic(), []
        with self._cond:
            for p, rows in batch:
                if not p.failed and p.deadline is not None and now >= p.deadline:
                    self._fail(p, DeadlineExpired("the deadline passed while the request waited in the queue"))
                if p.failed:
                    self._give_back(p.reservation, len(rows))
                else:
                    live.append((p, rows))
        return live

    def _process(self, batch: list[tuple[Pending, range]]) -> None:
        batch = self._live(batch)
        if not batch:
            return
        engine, key = batch[0][0].engine, batch[0][0].key
        texts = [p.texts[r] for p, rows in batch for r in rows]
        tokens = sum(p.tokens[r] for p, rows in batch for r in rows)
        self._running = (len(texts), tokens)
        if self.metrics:
            self.metrics.batch_size.observe(len(texts))
        started = time.perf_counter()
        try:
            results = _classify(engine, key, texts)
        except RaeeError as exc:
            if len({id(p) for p, _ in batch}) == 1:
                self._settle(batch[0][0], batch[0][1], exc)
                return
            for p, rows in batch:  # one request's bad input must not fail the others: run each alone
                try:
                    self._settle(p, rows, _classify(engine, key, [p.texts[r] for r in rows]))
                except RaeeError as alone:
                    self._settle(p, rows, alone)
            return
        seconds = time.perf_counter() - started
        if self.metrics:
            self.metrics.batch_seconds.observe(seconds)
        with self._cond:
            self._row_seconds = _smoothed(self._row_seconds, seconds / len(texts))
            self._costs.append((seconds / len(texts), seconds / max(tokens, 1)))
            self._cheapest = (min(row for row, _ in self._costs), min(token for _, token in self._costs))
        start = 0
        for p, rows in batch:
            self._settle(p, rows, results[start:start + len(rows)])
            start += len(rows)

    def _settle(self, p: Pending, rows: range, results: list[Classification] | BaseException) -> None:
        """Record a batch's answers (or error) for some rows of a request; answer the request when all are in."""
        with self._cond:
            self._give_back(p.reservation, len(rows))
            if p.failed:
                return
            if isinstance(results, BaseException):
                self._fail(p, results)
                return
            p.results[rows.start:rows.stop] = results
            answered = [r for r in p.results if r is not None]
            if len(answered) == len(p.results):
                p.future.set_result(BatchOutcome(answered, p.engine.store.version,
                                                 ((p.started or p.admitted) - p.admitted) * 1e3))


def _smoothed(average: float | None, value: float) -> float:
    return value if average is None else (1 - SMOOTHING) * average + SMOOTHING * value


def _classify(engine: Engine, key: BatchKey, texts: list[str]) -> list[Classification]:
    return engine.classify(texts, policy=key.policy, with_neighbours=key.neighbours)
