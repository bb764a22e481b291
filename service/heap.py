"""Keeping Python's cyclic garbage collector off the request path.

A loaded server holds about 400,000 objects the collector tracks (the tokenizer and the model's modules, mostly),
and a full collection walks every one: about 150 ms on the embedded default, during which every call waits, health
checks included. Under a flood of refused calls (each leaves a few reference cycles behind) one came every 20 s or
so. Once the backbone and stores are loaded, the objects alive are moved out of the collector's reach (gc.freeze),
so later collections walk only what requests allocate. Reloads do not freeze again: a store adds few tracked
objects (its arrays, index and texts are not tracked), and freezing while requests are in flight would keep any
of their objects that later become cyclic garbage for good.
"""

from __future__ import annotations

import gc
import logging
import time

log = logging.getLogger(__name__)


def freeze() -> None:
    """Collect, then exempt every object alive now from later collections."""
    started = time.perf_counter()
    gc.collect()
    gc.freeze()
    log.info("%d objects exempt from garbage collection (%.0f ms)", gc.get_freeze_count(),
             (time.perf_counter() - started) * 1e3)
