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
doubles with each refusal in a row, up to MAX_PUSHBACK_S; an admitted call resets it. A call from a client that
comes back sooner waits on the server until its time (costing a timer, not CPU), so clients that retry the instant
they are refused get answered at the pace they were told, and the server's CPU stays with the calls it admits; a
client that waits as told is answered at once.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict

import grpc

FREE_REFUSALS = 5.0  # bad-input refusals a client gets at once, refilled at this many per second
PAUSE_S = 0.25  # how long a refusal waits once the client's bucket is empty
MAX_CLIENTS = 4096  # buckets kept, least recently refused dropped first
FIRST_PUSHBACK_S = 0.025  # the first wait a client refused for a full queue is told, doubled each refusal in a row
MAX_PUSHBACK_S = 1.0
MAX_HELD = 128  # calls waiting for their client's time at once; past it a call goes on at once (RPC_HEADROOM bounds)
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
    """When each client refused for a full queue may come back. Used from the event loop only (no lock)."""

    def __init__(self, first_s: float = FIRST_PUSHBACK_S, max_s: float = MAX_PUSHBACK_S,
                 max_held: int = MAX_HELD) -> None:
        self.first_s, self.max_s, self.max_held = first_s, max_s, max_held
        self.held = 0  # calls waiting now
        self._clients: OrderedDict[str, tuple[int, float]] = OrderedDict()  # client -> (refusals in a row, back at)

    async def wait_turn(self, client: str) -> bool:
        """Wait until the time `client` was told to come back, if that is still ahead; whether the call waited. A
        call goes on at once when MAX_HELD calls already wait."""
        entry = self._clients.get(client)
        wait = entry[1] - time.monotonic() if entry is not None else 0.0
        if wait <= 0 or self.held >= self.max_held:
            return False
        self.held += 1
        try:
            await asyncio.sleep(wait)
        finally:
            self.held -= 1
        return True

    def refused(self, client: str) -> float:
        """Record a full-queue refusal of `client`; the seconds it is told to wait."""
        refusals, _ = self._clients.pop(client, (0, 0.0))
        wait = min(self.max_s, self.first_s * 2.0 ** min(refusals, 64))  # 2.0 ** 1024 would overflow
        self._clients[client] = (refusals + 1, time.monotonic() + wait)
        if len(self._clients) > MAX_CLIENTS:
            self._clients.popitem(last=False)
        return wait

    def admitted(self, client: str) -> None:
        """`client` got a call admitted: its next refusal starts again at FIRST_PUSHBACK_S."""
        self._clients.pop(client, None)
