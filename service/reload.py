"""The admin surface: who may reload a store, from which directories, one reload at a time, abandoned with its caller.

ReloadStore is served only where the configuration says: on a separate listener bound to admin_host (127.0.0.1 by
default), and on the public one only with a token. A store path must resolve (symlinks followed) inside one of the
store roots; a path outside gets the same answer whether it exists or not, so reloads cannot probe the disk.
"""

from __future__ import annotations

import asyncio
import hmac
import os
import threading
import time
from collections.abc import Sequence
from concurrent.futures import Executor
from pathlib import Path

from raee.errors import InputError
from raee.versions import read_limited, version_path
from service.config import SETTING_FILE_BYTES
from service.errors import AdminDisabled, OutsideStoreRoots, ReloadBusy, ReloadCancelled, Unauthenticated
from service.registry import StoreRegistry


class ReloadGuard:
    """Whether one listener serves ReloadStore, and the token a caller must present there."""

    def __init__(self, served: bool, token: str | None, refusal: str = "") -> None:
        self.served, self.token, self.refusal = served, token, refusal

    def check(self, metadata: Sequence[tuple[str, str | bytes]] | None) -> None:
        if not self.served:
            raise AdminDisabled(self.refusal)
        if self.token is None:
            return
        sent = next((v for k, v in metadata or () if k == "authorization"), "")
        sent = sent.decode("utf-8", "replace") if isinstance(sent, bytes) else sent
        if not sent:
            raise Unauthenticated("ReloadStore needs the admin token: send metadata 'authorization: Bearer TOKEN'")
        if not hmac.compare_digest(sent.encode(), f"Bearer {self.token}".encode()):
            raise Unauthenticated("the admin token does not match")


def read_token(path: str) -> str:
    """The admin token from a file (a mounted Secret); InputError if it is unreadable or empty."""
    try:
        token = read_limited(path, SETTING_FILE_BYTES).decode("utf-8").strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"admin_token_file {path}: cannot read it: {exc}") from None
    if len(token) < 16:
        raise InputError(f"admin_token_file {path}: the token must be at least 16 characters "
                         "(e.g. openssl rand -hex 32)")
    return token


class Reloader:
    """Runs reloads one at a time on a worker thread; a caller that goes away abandons its reload."""

    def __init__(self, registry: StoreRegistry, roots: Sequence[str], executor: Executor) -> None:
        self.registry, self.executor = registry, executor
        self.roots = [Path(os.path.realpath(r)) for r in roots]
        self._running = threading.Lock()

    def inside_roots(self, store_path: str) -> str:
        """The real path of a store path that lies in a store root; OutsideStoreRoots otherwise."""
        if not store_path:
            raise InputError("store_path is empty")
        if "\0" in store_path:
            raise InputError("store_path holds a NUL character")
        if len(store_path.encode("utf-8", "surrogatepass")) > PATH_MAX:  # resolving costs time with its length
            raise InputError(f"store_path is {len(store_path.encode('utf-8', 'surrogatepass'))} bytes; a path is "
                             f"at most {PATH_MAX}")
        real = Path(os.path.realpath(store_path))
        if not any(real == root or real.is_relative_to(root) for root in self.roots):
            raise OutsideStoreRoots(f"store path {store_path[:200]!r} is outside the store roots this server loads "
                                    f"from ({', '.join(map(str, self.roots))}); set store_roots to allow others")
        return str(real)

    async def reload(self, task: str, store_path: str, deadline: float | None, version: str = "") -> tuple[str, str]:
        """(previous version, new version). version: a version of the store directory to load instead of its
        CURRENT. ABORTED while another reload runs; abandoned (with the old store serving) if the caller's deadline
        passes or it cancels."""
        path = self.inside_roots(store_path)
        if version:
            path = self.inside_roots(str(version_path(path, version)))
        if not self._running.acquire(blocking=False):
            raise ReloadBusy("another reload is running; reloads run one at a time, retry when it has finished")
        cancelled = threading.Event()

        def check() -> None:
            if cancelled.is_set() or (deadline is not None and time.monotonic() > deadline):
                raise ReloadCancelled("the reload was abandoned: its deadline passed or its caller went away; the "
                                      "old store keeps serving")

        def run() -> tuple[str, str]:
            try:
                lower_priority()
                return self.registry.reload(task, path, check)
            finally:
                self._running.release()  # only when the work has stopped, not when the caller left

        try:
            work = asyncio.get_running_loop().run_in_executor(self.executor, run)
        except BaseException:
            self._running.release()
            raise
        try:
            return await work
        except asyncio.CancelledError:
            cancelled.set()
            raise


RELOAD_NICENESS = 10  # reloads yield the CPU to serving: a reload may take longer, requests should not
PATH_MAX = 4096  # bytes: the longest store path a reload resolves (Linux PATH_MAX)


def lower_priority() -> None:
    """Lower the calling thread's CPU priority (Linux: per-thread niceness); a no-op where not supported."""
    try:
        current = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), max(current, RELOAD_NICENESS))
    except (AttributeError, OSError):
        pass
