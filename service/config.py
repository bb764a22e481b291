"""Server configuration from a YAML file, RAEE_* environment variables and flags (later sources win)."""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from raee.errors import InputError
from raee.runtime import PRECISIONS, RUNTIMES, Precision, RuntimeChoice
from raee.versions import read_limited
from service.logs import LOG_FORMATS, LOG_LEVELS, LogFormat

DEFAULT_PORT = 50051
DEFAULT_METRICS_PORT = 9464
# The settings that take one of a closed set of words (log_level in any case).
CHOICES: dict[str, tuple[str, ...]] = {"runtime": RUNTIMES, "precision": PRECISIONS, "log_format": LOG_FORMATS,
                                       "log_level": LOG_LEVELS}


SETTING_FILE_BYTES = 1 << 20  # a config, token, certificate or key file: read whole, so read no more than this
DURATIONS = ("max_wait_ms", "max_batch_ms", "stream_idle_s", "grace_s", "drain_s", "max_connection_age_s",
             "max_connection_age_grace_s")  # finite, not negative, at most LONGEST_S
LONGEST_S = 2_000_000  # about 23 days: gRPC takes durations as 32-bit counts of milliseconds


@dataclass(frozen=True)
class ServerConfig:
    stores: tuple[str, ...] = field(default_factory=tuple)  # exit store directories; one task each
    host: str = "0.0.0.0"  # address to listen on
    port: int = DEFAULT_PORT  # gRPC port (0 = any free port); a port already taken is an error, never shared
    metrics_port: int = DEFAULT_METRICS_PORT  # Prometheus HTTP port (0 = any free port, -1 = off)
    max_batch: int = 32  # most rows the batcher sends through the backbone together; larger requests are split
    max_wait_ms: float = 5.0  # longest the batcher waits for more rows before running a batch
    wait_for_new_clients: bool = False  # wait all of max_wait even once every client heard from in the last second
    # has rows in the batch (by default the batch runs then: a lone client's request does not wait for company)
    max_batch_ms: float = 40.0  # while clients sending a few texts are about, batches shrink to about this long (down
    # to max_batch / 4; 0 = off), so that such a client waits about two such batches whatever others send
    max_queue: int = 1024  # most texts admitted and not yet answered; beyond it requests get RESOURCE_EXHAUSTED
    max_texts: int = 64  # most texts in one request (at most max_queue)
    max_text_bytes: int = 8192  # most UTF-8 bytes in one text
    max_streams: int = 256  # ClassifyStream calls open at once; beyond it a new stream gets RESOURCE_EXHAUSTED
    stream_idle_s: float = 60.0  # a stream that sends no request this long is closed (UNAVAILABLE); one that stops
    # reading is cancelled once a response has waited this long for each it may hold unread (up to 8) and one more
    grace_s: float = 15.0  # on SIGTERM, the longest the shutdown takes (notice period, then in-flight work)
    drain_s: float = 5.0  # on SIGTERM, how long health says NOT_SERVING and new calls get UNAVAILABLE before the
    # listener closes (at most grace_s), so probes and clients see the shutdown instead of a refused connection
    device: str = "cpu"  # cpu, cuda or cuda:N
    backbone: str | None = None  # backbone checkpoint; default: the source the stores' manifests name
    runtime: RuntimeChoice = "auto"  # auto (onnxruntime on the CPU where the family exports, else torch), torch,
    # onnxruntime
    precision: Precision | None = None  # fp32 or int8 (onnxruntime); default: the precision the stores were built at
    allow_precision_mismatch: bool = False  # serve stores built at another precision (exits may differ), warning
    threads: int = 0  # threads for torch, onnxruntime and FAISS; 0 = the container's CPU quota
    cache_dir: str | None = None  # where onnxruntime exports live (default RAEE_CACHE_DIR or ~/.cache/raee)
    tls_cert: str | None = None  # PEM certificate chain; with tls_key, serve TLS
    tls_key: str | None = None  # PEM private key
    tls_client_ca: str | None = None  # PEM CA certificates: with TLS, clients must present a certificate it signed
    # (mutual TLS); kubelet gRPC probes cannot, see the README
    admin: bool = False  # serve ReloadStore; needs admin_port or admin_token_file, so that no client can reload
    admin_host: str = "127.0.0.1"  # address of the admin listener
    admin_port: int = -1  # port of a listener that serves ReloadStore (-1 = none, 0 = any free port)
    admin_token_file: str | None = None  # file holding a token: ReloadStore then needs "authorization: Bearer T"
    store_roots: tuple[str, ...] = field(default_factory=tuple)  # directories reloads may load stores from;
    # default: the directories of `stores`
    max_connection_age_s: float = 0.0  # close each client connection after about this long (GOAWAY; clients
    # reconnect, without failing calls), 0 = never. gRPC keeps one connection open, so behind a Kubernetes
    # ClusterIP Service a client stays pinned to one replica: with an age, scaling out rebalances clients.
    max_connection_age_grace_s: float = 30.0  # calls still running when the age is reached get this long to finish
    log_format: LogFormat = "text"  # text, or json (one object per line, for a log pipeline)
    log_level: str = "info"  # debug, info (one line per request), warning (refusals and problems only), error

    def __post_init__(self) -> None:
        if not self.stores:
            raise InputError("no exit store given: pass --store DIR (one per task)")
        for name in ("max_batch", "max_queue", "max_texts", "max_text_bytes", "max_streams"):
            if getattr(self, name) < 1:
                raise InputError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.max_texts > self.max_queue:
            raise InputError(f"max_texts {self.max_texts} is larger than max_queue {self.max_queue}: a request of "
                             "max_texts texts could never be admitted")
        for name in DURATIONS:
            value = getattr(self, name)
            number = isinstance(value, (int, float)) and not isinstance(value, bool)
            seconds = value / 1000 if number and name.endswith("_ms") else value
            if not (number and math.isfinite(value) and 0 <= seconds <= LONGEST_S
                    and (seconds > 0 or name != "stream_idle_s")):
                unit = "milliseconds" if name.endswith("_ms") else "seconds"
                longest = LONGEST_S * 1000 if name.endswith("_ms") else LONGEST_S
                lowest = "above 0" if name == "stream_idle_s" else "from 0"
                raise InputError(f"{name} must be a number of {unit} {lowest} to {longest}, got {value!r}")
        for name in ("port", "metrics_port", "admin_port"):
            if not -1 <= getattr(self, name) <= 65535 or (name == "port" and self.port < 0):
                raise InputError(f"{name} must lie in 0..65535 (-1 = off for metrics_port and admin_port), got "
                                 f"{getattr(self, name)}")
        if bool(self.tls_cert) != bool(self.tls_key):
            raise InputError("TLS needs both tls_cert and tls_key")
        if self.tls_client_ca and not self.tls_cert:
            raise InputError("tls_client_ca (mutual TLS) needs TLS: set tls_cert and tls_key too")
        for name, choices in CHOICES.items():
            value = getattr(self, name)
            if value is not None and (value.lower() if name == "log_level" else value) not in choices:
                raise InputError(f"{name} {value!r} is not one of {', '.join(choices)}")
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
FIELD_TYPES = {f.name: str(f.type) for f in dataclasses.fields(ServerConfig)}  # "int", "float", "bool", "str | None"
BOOLEAN_WORDS = {"true": True, "yes": True, "on": True, "1": True, "false": False, "no": False, "off": False,
                 "0": False}


def _coerce(name: str, value: Any) -> Any:
    """A setting's value from YAML (typed) or an environment variable or flag (text), as its field's type."""
    kind = FIELD_TYPES[name]
    if name in ("stores", "store_roots"):
        return tuple(value.split(",") if isinstance(value, str) else value)
    if kind == "bool":
        if isinstance(value, bool):
            return value
        word = str(value).strip().lower()
        if word not in BOOLEAN_WORDS:
            raise InputError(f"{name} must be true or false, got {value!r}")
        return BOOLEAN_WORDS[word]
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
        kind = FIELD_TYPES[name]
        comment = "|".join(CHOICES[name]) if name in CHOICES else {"bool": "true/false"}.get(kind, kind)
        default = f.default if f.default is not dataclasses.MISSING else "none"
        p.add_argument(flag, dest=name, default=None, metavar=name.upper(), help=f"({comment}, default {default})")
    return p


def read_config_file(path: str) -> dict[str, Any]:
    """The settings of a YAML file; InputError (one line) for a file that is missing, unreadable or not a mapping."""
    import yaml
    try:
        spec = yaml.safe_load(read_limited(path, SETTING_FILE_BYTES).decode("utf-8"))
    except OSError as exc:
        raise InputError(f"--config {path}: {exc.strerror or exc}") from None
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        where = getattr(exc, "problem_mark", None)
        at = f" at line {where.line + 1}, column {where.column + 1}" if where is not None else ""
        problem = getattr(exc, "problem", None) or type(exc).__name__
        raise InputError(f"--config {path}: not valid YAML{at}: {problem}") from None
    if spec is None:
        return {}
    if not isinstance(spec, dict):
        raise InputError(f"--config {path}: expected a mapping of settings (like 'port: 50051'), got a "
                         f"{type(spec).__name__}")
    return spec


def load_config(argv: list[str] | None = None, environ: Mapping[str, str] | None = None) -> ServerConfig:
    args = parser().parse_args(argv)
    env: Mapping[str, str] = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    if args.config:
        spec = read_config_file(args.config)
        unknown = set(spec) - set(FIELDS)
        if unknown:
            raise InputError(f"{args.config}: unknown settings {sorted(unknown)}; valid: {sorted(FIELDS)}")
        values.update(spec)
    values.update({name: env[f"RAEE_{name.upper()}"] for name in FIELDS if f"RAEE_{name.upper()}" in env})
    values.update({name: value for name, value in vars(args).items() if name in FIELDS and value is not None})
    settings: dict[str, Any] = {}
    for name, value in values.items():
        try:
            settings[name] = _coerce(name, value)
        except InputError:
            raise
        except (TypeError, ValueError):
            raise InputError(f"{name} must be a{'n' if FIELD_TYPES[name] == 'int' else ''} {FIELD_TYPES[name]}, "
                             f"got {value!r}") from None
    return ServerConfig(**settings)
