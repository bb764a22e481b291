"""Where raee keeps what it derives from a checkpoint and can rebuild (self-check verdicts, runtime exports).

--cache-dir (`use`), else RAEE_CACHE_DIR, else $XDG_CACHE_HOME/raee, else ~/.cache/raee. A cache is an
optimisation: an unwritable one is logged and skipped, never an error.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


_chosen: Path | None = None


def use(directory: str | Path | None) -> None:
    """Use `directory` as the cache from now on (a --cache-dir flag); None goes back to the default."""
    global _chosen
    _chosen = Path(directory).expanduser() if directory else None


def cache_dir() -> Path:
    if _chosen is not None:
        return _chosen
    if os.environ.get("RAEE_CACHE_DIR"):
        return Path(os.environ["RAEE_CACHE_DIR"]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache").expanduser() / "raee"


def read_json(relative: str) -> dict[str, Any] | None:
    """A cached JSON object, or None when absent or unreadable."""
    path = cache_dir() / relative
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def write_json(relative: str, value: dict[str, Any]) -> None:
    """Write a cached JSON object atomically; an unwritable cache is logged, not raised."""
    path = cache_dir() / relative
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile("w", dir=path.parent, prefix=".tmp-", delete=False) as f:
            json.dump(value, f, indent=2)
        os.replace(f.name, path)
    except OSError as exc:
        log.info("cache %s not written (%s); it will be recomputed next time", path, exc)
