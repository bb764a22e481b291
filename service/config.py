"""Server configuration from a YAML file, RAEE_* environment variables and flags (later sources win)."""

from __future__ import annotations

import argparse
import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path

from raee.errors import InputError
from raee.runtime import PRECISIONS, RUNTIMES

DEFAULT_PORT = 50051
DEFAULT_METRICS_PORT = 9464


@dataclass(frozen=True)
class ServerConfig:
    stores: tuple[str, ...] = field(default_factory=tuple)  # exit store directories; one task each
    host: str = "0.0.0.0"  # address to listen on
    port: int = DEFAULT_PORT  # gRPC port (0 = any free port); a port already taken is an error, never shared
    metrics_port: int = DEFAULT_METRICS_PORT  # Prometheus HTTP port (0 = any free port, -1 = off)
    max_batch: int = 32  # most rows the batcher sends through the backbone together; larger requests are split
    max_wait_ms: float = 5.0  # longest the batcher waits for more rows before running a batch
    max_batch_ms: float = 100.0  # under load, batches shrink to about this long (down to max_batch / 4; 0 = off),
    # so that a client sending a few texts waits about two such batches whatever others send
    max_queue: int = 1024  # most texts admitted and not yet answered; beyond it requests get RESOURCE_EXHAUSTED
    max_texts: int = 64  # most texts in one request (at most max_queue)
    max_text_bytes: int = 8192  # most UTF-8 bytes in one text
    max_streams: int = 256  # ClassifyStream calls open at once; beyond it a new stream gets RESOURCE_EXHAUSTED
    stream_idle_s: float = 60.0  # a stream that sends no request for this long is closed (UNAVAILABLE)
    grace_s: float = 15.0  # on SIGTERM, the longest the shutdown takes (notice period, then in-flight work)
    drain_s: float = 5.0  # on SIGTERM, how long health says NOT_SERVING and new calls get UNAVAILABLE before the
    # listener closes (at most grace_s), so probes and clients see the shutdown instead of a refused connection
    device: str = "cpu"  # cpu, cuda or cuda:N
    backbone: str | None = None  # backbone checkpoint; default: the source the stores' manifests name
    runtime: str = "auto"  # auto (onnxruntime on the CPU where the family exports, else torch), torch, onnxruntime
    precision: str | None = None  # fp32 or int8 (onnxruntime); default: the precision the stores were built at
    allow_precision_mismatch: bool = False  # serve stores built at another precision (exits may differ), warning
    threads: int = 0  # threads for torch, onnxruntime and FAISS; 0 = the container's CPU quota
    cache_dir: str | None = None  # where onnxruntime exports live (default RAEE_CACHE_DIR or ~/.cache/raee)
    tls_cert: str | None = None  # PEM certificate chain; with tls_key, serve TLS
    tls_key: str | None = None  # PEM private key
    admin: bool = False  # serve ReloadStore; needs admin_port or admin_token_file, so that no client can reload
    admin_host: str = "127.0.0.1"  # address of the admin listener
    admin_port: int = -1  # port of a listener that serves ReloadStore (-1 = none, 0 = any free port)
    admin_token_file: str | None = None  # file holding a token: ReloadStore then needs "authorization: Bearer T"
    store_roots: tuple[str, ...] = field(default_factory=tuple)  # directories reloads may load stores from;
    # default: the directories of `stores`

    def __post_init__(self) -> None:
        if not self.stores:
            raise InputError("no exit store given: pass --store DIR (one per task)")
        for name in ("max_batch", "max_queue", "max_texts", "max_text_bytes", "max_streams"):
            if getattr(self, name) < 1:
                raise InputError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.max_texts > self.max_queue:
            raise InputError(f"max_texts {self.max_texts} is larger than max_queue {self.max_queue}: a request of "
                             "max_texts texts could never be admitted")
        if min(self.max_wait_ms, self.max_batch_ms, self.grace_s, self.drain_s) < 0 or self.stream_idle_s <= 0:
            raise InputError("max_wait_ms, max_batch_ms, grace_s and drain_s must not be negative, stream_idle_s "
                             "must be positive")
        for name in ("port", "metrics_port", "admin_port"):
            if not -1 <= getattr(self, name) <= 65535 or (name == "port" and self.port < 0):
                raise InputError(f"{name} must lie in 0..65535 (-1 = off for metrics_port and admin_port), got "
                                 f"{getattr(self, name)}")
        if bool(self.tls_cert) != bool(self.tls_key):
            raise InputError("TLS needs both tls_cert and tls_key")
        if self.runtime not in RUNTIMES:
            raise InputError(f"runtime {self.runtime!r} is not one of {', '.join(RUNTIMES)}")
        if self.precision is not None and self.precision not in PRECISIONS:
            raise InputError(f"precision {self.precision!r} is not one of {', '.join(PRECISIONS)}")
        if self.threads < 0:
            raise InputError(f"threads must be 0 (the CPU quota) or more, got {self.threads}")
        if self.admin and self.admin_port < 0 and not self.admin_token_file:
            raise InputError("admin: true would let any client reload stores; also set admin_port (a listener on "
                             "admin_host, 127.0.0.1 by default) or admin_token_file (a token clients must send)")

    @property
    def roots(self) -> tuple[str, ...]:
        """Directories a reload may load stores from."""
        return self.store_roots or self.stores


FIELDS = {f.name: f for f in dataclasses.fields(ServerConfig)}
TRUE_WORDS, FALSE_WORDS = ("1", "true", "yes", "on"), ("0", "false", "no", "off")  # booleans from flags and RAEE_*


def _coerce(name: str, value):
    kind = FIELDS[name].type
    if name in ("stores", "store_roots"):
        return tuple(value.split(",") if isinstance(value, str) else value)
    if kind == "bool" and isinstance(value, str):
        if value.strip().lower() not in TRUE_WORDS + FALSE_WORDS:
            raise InputError(f"{name}: {value!r} is not a boolean; use one of {', '.join(TRUE_WORDS + FALSE_WORDS)}")
        return value.strip().lower() in TRUE_WORDS
    if kind == "int":
        return int(value)
    if kind == "float":
        return float(value)
    return value


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="raee-serve", description="Serve exit stores over gRPC. Settings come from "
                                "--config YAML, then RAEE_<NAME> environment variables (e.g. RAEE_MAX_BATCH=16, "
                                "RAEE_STORES=a,b), then flags.")
    p.add_argument("--config", default=None, metavar="YAML", help="YAML file with any of the settings below")
    p.add_argument("--store", dest="stores", action="append", metavar="DIR", help="exit store (repeat per task)")
    for name, f in FIELDS.items():
        if name == "stores":
            continue
        flag = "--" + name.replace("_", "-")
        comment = {"bool": "true/false"}.get(f.type, f.type)
        default = f.default if f.default is not dataclasses.MISSING else "none"
        p.add_argument(flag, dest=name, default=None, metavar=name.upper(), help=f"({comment}, default {default})")
    return p


def load_config(argv: list[str] | None = None, environ: dict | None = None) -> ServerConfig:
    args = parser().parse_args(argv)
    environ = os.environ if environ is None else environ
    values: dict = {}
    if args.config:
        import yaml
        spec = yaml.safe_load(Path(args.config).read_text()) or {}
        unknown = set(spec) - set(FIELDS)
        if unknown:
            raise InputError(f"{args.config}: unknown settings {sorted(unknown)}; valid: {sorted(FIELDS)}")
        values.update(spec)
    values.update({name: environ[f"RAEE_{name.upper()}"] for name in FIELDS if f"RAEE_{name.upper()}" in environ})
    values.update({name: value for name, value in vars(args).items() if name in FIELDS and value is not None})
    try:
        return ServerConfig(**{name: _coerce(name, value) for name, value in values.items()})
    except (TypeError, ValueError) as exc:
        if isinstance(exc, InputError):
            raise
        raise InputError(f"bad setting: {exc}") from None
