"""Slowing down a client that keeps sending calls the server refuses: bad input, wrong credentials, reloads while
one runs.

Each client (connection) has a bucket of FREE_REFUSALS refusals that refills at that many per second. Such a
refusal takes one; once the bucket is empty, the answer waits PAUSE_S first. A closed loop of bad requests
(malformed bytes, texts past the token limit), of token guesses or of reload attempts then costs the server a few
calls a second per connection instead of hundreds, while a client that gets such an answer now and then gets it at
once. RESOURCE_EXHAUSTED, UNAVAILABLE and DEADLINE_EXCEEDED are never slowed: they tell a client to back off, and
say so at once.
"""

from __future__ import annotations

import time
from collections import OrderedDict

import grpc

FREE_REFUSALS = 5.0  # bad-input refusals a client gets at once, refilled at this many per second
PAUSE_S = 0.25  # how long a refusal waits once the client's bucket is empty
MAX_CLIENTS = 4096  # buckets kept, least recently refused dropped first
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
