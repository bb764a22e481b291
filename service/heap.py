"""Keeping Python's cyclic garbage collector off the request path.

A loaded server holds about 400,000 objects the collector tracks (the tokenizer, the model's modules, the stores),
and a full collection walks every one: about 150 ms on the embedded default, during which every call waits, health
checks included. Under a flood of refused calls (each leaves a few reference cycles behind) one came every 20 s or
so. Once the stores are loaded, and again after each reload, the objects alive are moved out of the collector's
reach (gc.freeze), so later collections walk only what requests allocate. After a reload only the young generations
are collected before freezing (milliseconds): the old store's objects hold no reference cycles, so they are freed
as soon as the last request using them ends, frozen or not (tests/test_service.py checks that they are).
"""

from __future__ import annotations

import gc
import logging
import time

log = logging.getLogger(__name__)


def freeze(why: str, generation: int = 2) -> None:
    """Collect up to `generation`, then exempt every object alive now from later collections."""
    started = time.perf_counter()
    gc.collect(generation)
    gc.freeze()
    log.info("%s: %d objects exempt from garbage collection (%.0f ms)", why, gc.get_freeze_count(),
             (time.perf_counter() - started) * 1e3)
