"""Waiting in tests for something to happen, instead of sleeping a fixed time: a loaded 2-core CI machine can take
ten times longer than expected to get there."""

from __future__ import annotations

import time
from collections.abc import Callable


def wait_until(condition: Callable[[], object], timeout: float = 20.0, every: float = 0.01) -> bool:
    """Poll `condition` until it is true or `timeout` seconds pass; whether it was true at the last poll."""
    deadline = time.monotonic() + timeout
    while not (ok := bool(condition())) and time.monotonic() < deadline:
        time.sleep(every)
    return ok
