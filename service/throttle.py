"""Slowing down a client that keeps sending calls the server refuses: bad input, wrong credentials, reloads while
one runs.

Each client (connection) has a bucket of FREE_REFUSALS refusals that refills at that many per second. Such a
refusal takes one; once the bucket is empty, the answer waits PAUSE_S first. A closed loop of bad requests
(malformed bytes, texts past the token limit), of token guesses or of reload attempts then costs the server a few
calls a second per connection instead of hundreds, while a client that gets such an answer now and then gets it at
once. RESOURCE_EXHAUSTED, UNAVAILABLE and DEADLINE_EXCEEDED are never slowed this way: they tell a client to back
off, and say so at once.

A refusal for a full queue also says when to come back (`Pushback`): gRPC's `grpc-retry-pushback-ms` trailer, which
gRPC clients with a retry policy obey, and the same figure in the message. The wait starts at FIRST_PUSHBACK_S and
doubles with each refusal in a row, up to MAX_PUSHBACK_S; an answered call resets it. A call from a client that
comes back sooner waits on the server until its time (costing a timer, not CPU), so clients that retry the instant
they are refused get answered at the pace they were told, and the server's CPU stays with the calls it admits; a
client that waits as told is answered at once. A call that cannot wait (its deadline comes first, or too many
already wait) is refused at once, told the time left.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from collections.abc import Callable

import grpc

from service.errors import QueueFull

FREE_REFUSALS = 5.0  # bad-input refusals a client gets at once, refilled at this many per second
PAUSE_S = 0.25  # how long a refusal waits once the client's bucket is empty
MAX_CLIENTS = 4096  # buckets kept, least recently refused dropped first
FIRST_PUSHBACK_S = 0.025  # the first wait a client refused for a full queue is told, doubled each refusal in a row
MAX_PUSHBACK_S = 1.0
MAX_HELD = 128  # calls waiting for their client's time at once; past it they are refused at once (RPC_HEADROOM bounds)
MAX_HELD_PER_CLIENT = 8  # the same for one client, so that one cannot take every place
PUSHBACK_TRAILER = "grpc-retry-pushback-ms"
SLOWED = frozenset({grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.UNAUTHENTICATED,
                    grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.ABORTED})


class RefusalThrottle:
    def __init__(self, free: float = FREE_REFUSALS, pause_s: float = PAUSE_S) -> None:
        self.free, self.pause_s = free, pause_s
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()  # client -> (refusals left, when)

    def pause_for(self, client: str) -> float:
        """Record a refusal for `client`; the seconds its answer should wait (0 while within bounds). Called from
        the event loop only, so it needs no lock."""
        now = time.monotonic()
        left, then = self._buckets.pop(client, (self.free, now))
        left = min(self.free, left + (now - then) * self.free) - 1
        self._buckets[client] = (max(left, -1.0), now)
        if len(self._buckets) > MAX_CLIENTS:
            self._buckets.popitem(last=False)
        return self.pause_s if left < 0 else 0.0


class Pushback:
    """When each client (connection) refused for a full queue may come back. Used from the event loop only (no lock).

    The key is the connection, as for the other refusals: gRPC multiplexes a process's calls on one connection, so
    every call on it is held to the time it was told. Refusals that come while that time is still ahead (calls
    already in flight, or sent without waiting) are told the time left and do not double the wait."""

    def __init__(self, first_s: float = FIRST_PUSHBACK_S, max_s: float = MAX_PUSHBACK_S, max_held: int = MAX_HELD,
                 max_held_per_client: int = MAX_HELD_PER_CLIENT, on_hold: Callable[[], object] | None = None) -> None:
        self.first_s, self.max_s = first_s, max_s
        self.max_held, self.max_held_per_client = max_held, max_held_per_client
        self.on_hold = on_hold  # called as a call starts to wait (a metric)
        self.held = 0  # calls waiting now
        self._held_by: dict[str, int] = {}  # the same, per client
        self._clients: OrderedDict[str, tuple[int, float]] = OrderedDict()  # client -> (refusals in a row, back at)

    def wait_s(self, client: str) -> float:
        """Seconds until `client` may come back (0 when it may now)."""
        entry = self._clients.get(client)
        return max(0.0, entry[1] - time.monotonic()) if entry is not None else 0.0

    async def wait_turn(self, client: str, deadline: float | None = None) -> bool:
        """Wait until the time `client` was told to come back, if that is still ahead; whether the call waited.
        QueueFull at once instead when the wait would pass the call's deadline (time.monotonic()), or when MAX_HELD
        calls, or MAX_HELD_PER_CLIENT of this client's, already wait."""
        wait = self.wait_s(client)
        if wait <= 0:
            return False
        mine = self._held_by.get(client, 0)
        if ((deadline is not None and time.monotonic() + wait > deadline) or self.held >= self.max_held
                or mine >= self.max_held_per_client):
            raise QueueFull("the queue was full and this connection came back before the time it was told")
        self.held, self._held_by[client] = self.held + 1, mine + 1
        if self.on_hold is not None:
            self.on_hold()
        try:
            await asyncio.sleep(wait)
        finally:
            self.held -= 1
            left = self._held_by.pop(client) - 1
            if left:
                self._held_by[client] = left
        return True

    def refused(self, client: str) -> float:
        """Record a full-queue refusal of `client`; the seconds it is told to wait."""
        now = time.monotonic()
        refusals, back_at = self._clients.pop(client, (0, 0.0))
        if back_at <= now:  # a new refusal in a row: the wait doubles
            wait = min(self.max_s, self.first_s * 2.0 ** min(refusals, 64))  # 2.0 ** 1024 would overflow
            refusals, back_at = refusals + 1, now + wait
        else:
            wait = back_at - now
        self._clients[client] = (refusals, back_at)
        if len(self._clients) > MAX_CLIENTS:
            self._clients.popitem(last=False)
        return wait

    def admitted(self, client: str) -> None:
        """`client` got a call answered: its next refusal starts again at FIRST_PUSHBACK_S, and a time to come back
        that is still ahead stays (it was told to other calls on the connection)."""
        entry = self._clients.pop(client, None)
        if entry is not None and entry[1] > time.monotonic():
            self._clients[client] = (0, entry[1])
