"""raee-serve's logs: text or JSON lines at a chosen level, one line per request, and nothing from third parties'
progress bars or gRPC's C core on the way.

A request line names the request id (the caller's `x-request-id` metadata, else the request's request_id, else one
made up; unary calls get it back in trailing metadata), the task, the number of texts, the policy, the exit layers
(min/mean/max over the texts, of the depth), how many texts were cut to fit (a request with truncate), the
milliseconds and the status code.
"""

from __future__ import annotations

import json
import logging
import sys
import time
import uuid
from collections.abc import Sequence
from typing import Literal, get_args

LogFormat = Literal["text", "json"]
LOG_FORMATS: tuple[LogFormat, ...] = get_args(LogFormat)
LOG_LEVELS = ("debug", "info", "warning", "error")
REQUEST_ID = "x-request-id"
MAX_REQUEST_ID = 128  # characters of a caller's request id kept (it is logged and echoed)
requests_log = logging.getLogger("raee-serve.requests")


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, and a record's `fields` as keys of their own."""

    def format(self, record: logging.LogRecord) -> str:
        line = {"time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) +
                f".{int(record.msecs):03d}Z", "level": record.levelname.lower(), "logger": record.name,
                "message": record.getMessage()}
        line.update(getattr(record, "fields", {}))
        if record.exc_info:
            line["traceback"] = self.formatException(record.exc_info)
        return json.dumps(line, ensure_ascii=False, default=str)


def configure(log_format: LogFormat = "text", level: str = "info") -> None:
    """Route every logger to stderr in `log_format` at `level`; turn third-party progress bars off. As with
    logging.basicConfig, a process whose logging is already set up (a test runner, an embedding program) keeps it."""
    root = logging.getLogger()
    if not root.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(JsonFormatter() if log_format == "json" else
                             logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        root.addHandler(handler)
        root.setLevel(level.upper())
    for noisy in ("faiss.loader", "httpx", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    from transformers.utils import logging as transformers_logging
    transformers_logging.disable_progress_bar()  # type: ignore[no-untyped-call]  # unannotated in transformers


def printable(text: str, limit: int) -> str:
    """A client's string as a log line shows it: its first `limit` characters, written as a Python literal (quoted,
    escaped) unless all of them are printable and none is a space or '=', so that no client can start a log line
    of its own or add key=value fields to one."""
    cut = text[:limit]
    return cut if cut.isprintable() and " " not in cut and "=" not in cut else repr(cut)


def request_id(metadata: Sequence[tuple[str, str | bytes]] | None, own: str = "") -> str:
    """The caller's x-request-id, else the request's own id, else a new one."""
    sent = next((v for k, v in metadata or () if k == REQUEST_ID), "")
    sent = sent.decode("utf-8", "replace") if isinstance(sent, bytes) else sent
    chosen = (sent or own).strip()[:MAX_REQUEST_ID]
    return chosen if chosen.isprintable() and chosen else uuid.uuid4().hex[:16]


def log_request(rid: str, task: str, texts: int, policy: str, exits: Sequence[int], num_layers: int, ms: float,
                code: str, truncated: int = 0) -> None:
    """The one line of a Classify request (or of one request of a stream)."""
    if not requests_log.isEnabledFor(logging.INFO):
        return
    summary = (f"{min(exits)}/{sum(exits) / len(exits):.1f}/{max(exits)} of {num_layers}" if exits else "-")
    fields = {"request_id": rid, "task": printable(task, 100), "texts": texts, "policy": policy, "exit_layers": summary,
              "truncated": truncated, "ms": round(ms, 2), "code": code}
    requests_log.info("request %s", " ".join(f"{k}={v}" for k, v in fields.items()), extra={"fields": fields})
