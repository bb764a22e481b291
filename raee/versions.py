"""A store directory's versions: which one is CURRENT, which were, the writer's lock, and pruning.

    DIR/CURRENT       name of the version in service (replaced atomically with os.replace)
    DIR/HISTORY       every version that was CURRENT, oldest first: pruning keeps the last few of these
    DIR/.lock         held by a writer for the whole write, so concurrent writers take turns
    DIR/.incoming-*   a version being written; one left behind by a crashed write is removed at the next write
    DIR/v<timestamp>/ one complete version (raee.store)
"""

from __future__ import annotations

import errno
import fcntl
import io
import logging
import os
import secrets
import shutil
import stat
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path

from raee.errors import StoreError
from raee.manifest import VERSION_NAME

log = logging.getLogger(__name__)

KEEP_VERSIONS = 3  # versions that were CURRENT kept for rollback, the serving one included
MAX_POINTER_BYTES = 256  # CURRENT and manifest.sha256
MAX_HISTORY = 100  # lines of HISTORY kept
STALE_STAGING_S = 3600.0  # without a working lock, staging dirs older than this count as a crashed writer's


def resolve_version(path: str | Path) -> Path:
    """The version directory a path names: itself if it holds a manifest, else the one its CURRENT names."""
    path = Path(path)
    try:
        if (path / "manifest.json").is_file():
            return path
        if not (path / "CURRENT").is_file():
            raise StoreError(f"{path}: not an exit store (no manifest.json and no CURRENT); build one with "
                             "raee-index build")
        name = read_small(path / "CURRENT", MAX_POINTER_BYTES).decode("utf-8", "replace").strip()
        if not VERSION_NAME.fullmatch(name):
            raise StoreError(f"{path}/CURRENT holds {name!r:.80}, not a version name; it must name a version "
                             "directory inside the store (like v20260101T000000000000Z)")
        if not (path / name / "manifest.json").is_file():
            raise StoreError(f"{path}: CURRENT names {name}, which is missing or incomplete")
        return path / name
    except OSError as exc:
        raise store_error(path, exc) from None


def check_store_root(root: str | Path) -> None:
    """Raise StoreError unless `root` is, or can become, a store directory this user can write: a check to run
    before a long calibration pass rather than after it."""
    root = Path(root)
    try:
        if (root / "manifest.json").exists():
            raise StoreError(f"{root} is a single store version, not a store directory; choose another output")
        foreign = [p.name for p in root.iterdir() if not store_entry(p.name)] if root.exists() else []
        if foreign:
            raise StoreError(f"{root} exists and is not an exit store (it holds {', '.join(sorted(foreign)[:3])}); "
                             "refusing to write into it")
        root.mkdir(parents=True, exist_ok=True)
        probe = root / f".incoming-probe-{secrets.token_hex(4)}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise store_error(root, exc, "cannot write the store") from None


def new_version_name(root: Path) -> str:
    while True:
        name = "v" + datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S%fZ")
        if not (root / name).exists():
            return name
        time.sleep(1e-5)


def store_entry(name: str) -> bool:
    """Names a store directory may hold, crashed writes' leftovers included."""
    return (name in ("CURRENT", ".CURRENT.tmp", "HISTORY", ".HISTORY.tmp", ".lock") or name.startswith(".incoming-")
            or bool(VERSION_NAME.fullmatch(name)))


@contextmanager
def writer_lock(root: Path) -> Iterator[bool]:
    """Hold root/.lock exclusively for a write; yields whether the lock works here (some network filesystems
    refuse locks: then writers are not serialised, and only old staging dirs count as stale)."""
    with open(root / ".lock", "a+b") as f:
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        except OSError as exc:
            if exc.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
                raise
            log.warning("%s: cannot lock the store (%s); concurrent writers are not serialised", root, exc.strerror)
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def remove_stale_staging(root: Path, locked: bool) -> None:
    """Remove staging dirs of writes that crashed: with the lock held, no other write is under way."""
    for p in root.iterdir():
        if p.name.startswith(".incoming-") and (locked or time.time() - p.stat().st_mtime > STALE_STAGING_S):
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
            log.info("removed %s, left by a write that did not finish", p)


def point_current(root: Path, name: str) -> None:
    """Make `name` the version in service and record it in HISTORY."""
    history = [*_history(root), name][-MAX_HISTORY:]
    _replace_synced(root, "CURRENT", name + "\n")
    _replace_synced(root, "HISTORY", "".join(v + "\n" for v in history))


def current_version(root: str | Path) -> str:
    """The version name CURRENT holds."""
    return resolve_version(root).name


def switch_current(root: str | Path, name: str, keep: int = KEEP_VERSIONS) -> str:
    """Make an existing, complete version current (a rollout's last step, or a rollback); returns the version that
    was current. StoreError if `name` is not a complete version of this store."""
    root = Path(root)
    if not VERSION_NAME.fullmatch(name):
        raise StoreError(f"{name!r:.80} is not a version name (like v20260101T000000000000Z)")
    try:
        with writer_lock(root):
            if not (root / name / "manifest.json").is_file():
                raise StoreError(f"{root} has no complete version {name}")
            previous = current_version(root)
            if previous != name:
                point_current(root, name)
                prune(root, keep)
    except OSError as exc:
        raise store_error(root, exc, "cannot switch CURRENT") from None
    log.info("%s: CURRENT %s -> %s", root, previous, name)
    return previous


def previous_version(root: str | Path) -> str:
    """The version that was current before the current one and still exists (what a rollback goes back to)."""
    root = Path(root)
    current = current_version(root)
    for name in reversed(_history(root)):
        if name != current and (root / name / "manifest.json").is_file():
            return name
    raise StoreError(f"{root}: no earlier version to go back to (HISTORY holds none that still exists)")


def latest_version(root: str | Path) -> str:
    """The newest complete version of a store (names sort by time), current or not."""
    names = [p.name for p in Path(root).iterdir() if VERSION_NAME.fullmatch(p.name) and (p / "manifest.json").is_file()]
    if not names:
        raise StoreError(f"{root}: no complete version")
    return max(names)


def version_path(root: str | Path, name: str) -> Path:
    """The directory of version `name` of a store; StoreError unless it is a complete version."""
    if not VERSION_NAME.fullmatch(name):
        raise StoreError(f"{name!r:.80} is not a version name (like v20260101T000000000000Z)")
    path = Path(root) / name
    if not (path / "manifest.json").is_file():
        raise StoreError(f"{root} has no complete version {name}")
    return path


def _history(root: Path) -> list[str]:
    """Versions that were CURRENT, oldest first. Stores written before HISTORY existed promoted every version they
    wrote, so there the versions up to CURRENT count as promoted, in name order."""
    if (root / "HISTORY").is_file():
        return [v for v in (root / "HISTORY").read_text().split() if VERSION_NAME.fullmatch(v)]
    if not (root / "CURRENT").is_file():
        return []
    current = (root / "CURRENT").read_text().strip()
    return sorted(p.name for p in root.iterdir() if VERSION_NAME.fullmatch(p.name) and p.name <= current)


def prune(root: Path, keep: int) -> None:
    """Delete versions but the last `keep` that were CURRENT, the current one, and any newer than it (written but
    not yet promoted). Versions never promoted and older than the current one are leftovers of crashed writes."""
    current = (root / "CURRENT").read_text().strip()
    promoted = list(dict.fromkeys(reversed(_history(root))))  # newest first, each once
    kept = {current, *promoted[:max(keep, 1)]}
    for p in root.iterdir():
        if p.is_dir() and VERSION_NAME.fullmatch(p.name) and p.name not in kept and p.name < current:
            shutil.rmtree(p, ignore_errors=True)
            log.info("pruned store version %s", p)


def _replace_synced(root: Path, name: str, text: str) -> None:
    tmp = root / f".{name}.tmp"
    write_synced(tmp, text.encode("utf-8"))
    os.replace(tmp, root / name)
    fsync(root)


def write_synced(path: Path, data: bytes) -> None:
    with path.open("wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def open_regular(path: str | Path) -> io.BufferedReader:
    """A file opened for reading; OSError (EINVAL, "not a regular file") if it is not a regular file. Opening does
    not wait: a FIFO put where a store file belongs, or given as a setting's file, would otherwise hold the reader
    (and every reload after it) until someone wrote, and /dev/zero would be read until memory ran out."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(errno.EINVAL, "not a regular file", str(path))
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def read_limited(path: str | Path, limit: int) -> bytes:
    """A small regular file's bytes; OSError (EFBIG) if it holds more than `limit`, or as open_regular."""
    with open_regular(path) as f:
        data = f.read(limit + 1)
    if len(data) > limit:
        raise OSError(errno.EFBIG, f"larger than {limit} bytes", str(path))
    return data


def read_small(path: Path, limit: int) -> bytes:
    """A small store file's bytes; StoreError if it holds more than `limit`, OSError if it is not a regular file."""
    try:
        return read_limited(path, limit)
    except OSError as exc:
        if exc.errno == errno.EFBIG:
            raise StoreError(f"{path} is larger than {limit} bytes; it is not one raee wrote") from None
        raise


def store_error(where: Path, exc: OSError, doing: str = "cannot read the store") -> StoreError:
    """One line for an OSError: which file, what the system said."""
    name = f" ({exc.filename})" if exc.filename and str(exc.filename) != str(where) else ""
    return StoreError(f"{where}: {doing}: {exc.strerror or exc}{name}")
