"""The tasks a server answers: one Engine per task, all sharing one backbone, swapped atomically on reload."""

from __future__ import annotations

import logging
import threading

from raee.backbones import Backbone
from raee.engine import Engine
from raee.errors import InputError, StoreError, StoreMismatchError
from raee.keys import Embedder
from raee.store import Check, load_store
from service.errors import UnknownTask

log = logging.getLogger(__name__)


class StoreRegistry:
    def __init__(self, backbone: Backbone, device: str = "cpu", allow_precision_mismatch: bool = False) -> None:
        self.backbone, self.device = backbone, device
        self.allow_precision_mismatch = allow_precision_mismatch
        self._engines: dict[str, Engine] = {}
        self._embedders: dict[str, Embedder] = {}
        self._lock = threading.Lock()  # guards _engines
        self._load_lock = threading.Lock()  # one add/reload at a time (embedder cache, previous version)

    def _engine(self, store_dir: str, check: Check | None = None) -> Engine:
        """Load and verify a store (checksums, sense, backbone and embedder fingerprints), build its Engine and warm
        it on one query, so that nothing the store holds fails for the first request."""
        store = load_store(store_dir, check)
        if store.manifest.shard is not None:
            shard = store.manifest.shard
            raise StoreError(f"{store.path} is shard {shard.index}/{shard.count} of a build; merge the shards with "
                             "raee-index merge and serve the merged store")
        embedder = None
        if store.manifest.embedder is not None:
            source = store.manifest.embedder.source
            if source not in self._embedders:
                self._embedders[source] = Embedder(source, device=self.device)
            embedder = self._embedders[source]
        engine = Engine(store, self.backbone, embedder, self.allow_precision_mismatch)
        if check is not None:
            check()
        try:  # the first call also allocates, dispatches and fills caches: better here than on a request
            engine.classify([store.texts[0]])
        except Exception as exc:  # noqa: BLE001 - anything the store makes fail is a reason to refuse it
            raise StoreError(f"{store.path}: the store fails on its own first item: {exc}") from exc
        return engine

    def add(self, store_dir: str) -> Engine:
        with self._load_lock:
            engine = self._engine(store_dir)
        with self._lock:
            if engine.task.name in self._engines:
                raise InputError(f"two stores for task {engine.task.name}: {self._engines[engine.task.name].store.path}"
                                 f" and {engine.store.path}")
            self._engines[engine.task.name] = engine
        log.info("serving task %s from %s (%d items, key %s)", engine.task.name, engine.store.path,
                 engine.store.records.num_items, engine.store.key)
        return engine

    def get(self, task: str) -> Engine:
        engine = self._engines.get(task)
        if engine is None:
            raise UnknownTask(f"unknown task {task[:100]!r}; this server answers "
                              f"{', '.join(sorted(self._engines)) or 'none'}")
        return engine

    def engines(self) -> list[Engine]:
        return list(self._engines.values())

    def reload(self, task: str, store_dir: str, check: Check | None = None) -> tuple[str, str]:
        """Verify a new store fully and warm it, then swap it in; (previous version, new version). Requests already
        admitted keep the engine they started with; the old store keeps serving if anything fails.

        check: called between steps; it may raise to abandon the reload (its caller went away)."""
        with self._load_lock:
            previous = self.get(task)
            engine = self._engine(store_dir, check)
            if engine.task.name != task:
                raise StoreMismatchError(f"{store_dir} is a store for task {engine.task.name}, not {task}")
            if check is not None:
                check()
            with self._lock:
                self._engines[task] = engine
        log.info("task %s: store %s -> %s", task, previous.store.version, engine.store.version)
        return previous.store.version, engine.store.version
