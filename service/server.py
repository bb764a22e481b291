"""raee-serve: the gRPC server. It listens at once with health NOT_SERVING, loads the backbone and stores, warms
them, then turns SERVING. SIGTERM: NOT_SERVING and new calls refused (UNAVAILABLE) while the listener stays up for
drain_s, in-flight work finishes, then the listener closes; all within grace_s.

The gRPC side runs on an asyncio event loop in a thread of its own: an open stream costs a coroutine, not a
thread, so idle streams cannot starve health checks or other calls. The loop never runs model code: requests are
tokenized on a small pool, batches run on the batcher's thread, reloads on a thread of their own.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable, Coroutine
from concurrent.futures import ThreadPoolExecutor
from types import FrameType
from typing import Any, TypeVar
from wsgiref.simple_server import WSGIServer

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from raee import cache
from raee.backbones import Backbone
from raee.engine import load_backbone_for
from raee.errors import RaeeError
from raee.runtime import configure_threads
from raee.store import load_store
from raee.versions import read_limited
from service import heap, logs, reflection
from service.admission import Admission
from service.batcher import MicroBatcher
from service.config import SETTING_FILE_BYTES, ServerConfig, load_config
from service.errors import StartupError
from service.handlers import SERVICE, raee_handler
from service.metrics import ServerMetrics
from service.registry import StoreRegistry
from service.reload import Reloader, ReloadGuard, read_token
from service.servicer import RaeeServicer
from service.streams import StreamSlots
from service.throttle import Pushback, RefusalThrottle

log = logging.getLogger("raee-serve")
SERVICE_NAME = SERVICE.full_name  # "raee.v1.Raee"
VALIDATION_THREADS = 2  # tokenize incoming requests apart from the batcher
RPC_HEADROOM = 256  # calls beyond the queue and streams that may be in progress at once (health, info, refusals)
# Calls received and not yet handed to a handler, as a multiple of the calls in progress. Past gRPC's defaults (1000,
# hard 3000) it cancels calls unseen and uncounted: a 3000-call burst lost 440-660 of them that way.
PENDING_CALLS = 4
T = TypeVar("T")


class RaeeServer:
    """One server process: gRPC (Raee, health, reflection), an optional admin listener, Prometheus metrics."""

    def __init__(self, config: ServerConfig, backbone: Backbone | Callable[[], Backbone] | None = None) -> None:
        """backbone: a loaded backbone, a function that loads one, or None to load what the stores name."""
        self.config = config
        cache.use(config.cache_dir)
        configure_threads(config.threads or None)
        self.metrics = ServerMetrics()
        token = read_token(config.admin_token_file) if config.admin_token_file else None
        self.admission = Admission(config, ThreadPoolExecutor(VALIDATION_THREADS, thread_name_prefix="raee-validate"))
        streams = StreamSlots(config.max_streams)
        on_public = config.admin and token is not None
        refusal = ("ReloadStore is off on this server (admin: false)" if not config.admin else
                   f"ReloadStore is served on the admin listener only ({config.admin_host}:{config.admin_port})")
        throttle, pushback = RefusalThrottle(), Pushback(on_hold=self.metrics.held_calls.inc)
        self.servicer = RaeeServicer(config, self.metrics, self.admission, streams,
                                     ReloadGuard(on_public, token, refusal), throttle, pushback)
        self.admin_servicer = (RaeeServicer(config, self.metrics, self.admission, streams, ReloadGuard(True, token),
                                            throttle, pushback) if config.admin and config.admin_port >= 0 else None)
        self._reloads = ThreadPoolExecutor(1, thread_name_prefix="raee-reload")
        self._backbone = backbone
        self._loop = asyncio.new_event_loop()
        self._loop_thread = threading.Thread(target=self._loop.run_forever, name="raee-grpc", daemon=True)
        self._listeners: list[grpc.aio.Server] = []
        self._http: WSGIServer | None = None
        self.health: health.aio.HealthServicer | None = None  # made on the event loop (_listen)
        self._health_names: tuple[str, ...] = ("", SERVICE_NAME)
        self.port: int | None = None  # bound ports, once start() has bound them (0 in the config: any free one)
        self.admin_port: int | None = None
        self.metrics_port: int | None = None
        self.registry: StoreRegistry | None = None
        self.batcher: MicroBatcher | None = None
        self.loaded = threading.Event()
        self.load_error: BaseException | None = None
        self._stopped = threading.Event()

    def _on_loop(self, coroutine: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result()

    # -- start ----------------------------------------------------------------------------------------------------
    def start(self) -> "RaeeServer":
        """Bind every listener (StartupError naming a taken port), then load in the background."""
        self._loop_thread.start()
        try:
            self._on_loop(self._listen())
            if self.config.metrics_port >= 0:
                try:
                    self._http, _ = self.metrics.serve(self.config.metrics_port, self.config.host)
                except OSError as exc:
                    raise StartupError(f"cannot serve metrics on {self.config.host}:{self.config.metrics_port}: "
                                       f"{exc.strerror or exc}; choose another metrics_port (-1 = off)") from None
                self.metrics_port = self._http.server_port
        except BaseException:
            self._on_loop(self._close_listeners(0))
            self._stop_loop()
            raise
        log.info("listening on %s:%d (admin %s, metrics %s), loading", self.config.host, self.port,
                 self.admin_port, self.metrics_port)
        threading.Thread(target=self._load, name="raee-load", daemon=True).start()
        return self

    async def _listen(self) -> None:
        self.health = health.aio.HealthServicer()
        await self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        self.port = self._listener(self.servicer, self.config.host, self.config.port)
        if self.admin_servicer is not None:
            self.admin_port = self._listener(self.admin_servicer, self.config.admin_host, self.config.admin_port)
        for listener in self._listeners:
            await listener.start()

    def _listener(self, servicer: RaeeServicer, host: str, port: int) -> int:
        c = self.config
        largest_request = c.max_texts * (c.max_text_bytes + 16) + (64 << 10)
        in_progress = c.max_queue + c.max_streams + RPC_HEADROOM
        options = [("grpc.so_reuseport", 0),  # a second server on a taken port fails instead of sharing it
                   ("grpc.server.max_pending_requests", PENDING_CALLS * in_progress),
                   ("grpc.server.max_pending_requests_hard_limit", 2 * PENDING_CALLS * in_progress),
                   ("grpc.max_receive_message_length", max(4 << 20, 2 * largest_request))]
        if c.max_connection_age_s > 0:  # clients reconnect, through the Service, to any replica
            options += [("grpc.max_connection_age_ms", int(c.max_connection_age_s * 1e3)),
                        ("grpc.max_connection_age_grace_ms", int(c.max_connection_age_grace_s * 1e3))]
        server = grpc.aio.server(
            options=options,
            maximum_concurrent_rpcs=in_progress)
        server.add_generic_rpc_handlers((raee_handler(servicer, self.metrics),))
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        reflection.enable((SERVICE_NAME, health.SERVICE_NAME), server)
        self._listeners.append(server)
        address = f"{host}:{port}"
        check_port_free(host, port, "gRPC" if servicer is self.servicer else "admin")
        try:
            if c.tls_cert and c.tls_key:  # both or neither (ServerConfig)
                pair = (read_limited(c.tls_key, SETTING_FILE_BYTES),
                        read_limited(c.tls_cert, SETTING_FILE_BYTES))
                client_ca = read_limited(c.tls_client_ca, SETTING_FILE_BYTES) if c.tls_client_ca else None
                credentials = grpc.ssl_server_credentials([pair], root_certificates=client_ca,
                                                          require_client_auth=client_ca is not None)
                bound = server.add_secure_port(address, credentials)
            else:
                bound = server.add_insecure_port(address)
        except OSError as exc:
            raise StartupError(f"cannot read the TLS key or certificate: {exc}") from None
        except RuntimeError:
            bound = 0
        if not bound:
            raise StartupError(f"cannot listen on {address}: the port is taken or the address is not this host's")
        return bound

    def _load(self) -> None:
        try:
            if isinstance(self._backbone, Backbone):
                backbone = self._backbone
            else:
                backbone = (self._backbone or self._load_backbone)()
            registry = StoreRegistry(backbone, self.config.device, self.config.allow_precision_mismatch)
            for store in self.config.stores:
                registry.add(store)  # verified and warmed on one query
            self.batcher = MicroBatcher(self.config.max_batch, self.config.max_wait_ms, self.config.max_queue,
                                        self.metrics, self.config.max_batch_ms, self.config.wait_for_new_clients)
            reloader = Reloader(registry, self.config.roots, self._reloads)
            for servicer in (self.servicer, self.admin_servicer):
                if servicer is not None:
                    servicer.reloader = reloader
            self.registry = registry
            self.metrics.depth(backbone.num_layers)
            for engine in registry.engines():
                self.metrics.serving(engine.task.name, engine.store.version)
            heap.freeze()
            self.admission.ready(registry, self.batcher)
            self._health_names += tuple(e.task.name for e in registry.engines())
            self._on_loop(self._set_health(health_pb2.HealthCheckResponse.SERVING))
            log.info("SERVING tasks %s on %s backbone %s", [e.task.name for e in registry.engines()],
                     backbone.kind, backbone.source)
        except BaseException as exc:  # noqa: BLE001 - reported to the operator, health stays NOT_SERVING
            self.load_error = exc
            log.error("cannot serve: %s", exc)
        finally:
            self.loaded.set()

    def _load_backbone(self) -> Backbone:
        c = self.config
        return load_backbone_for(load_store(c.stores[0]).manifest, source=c.backbone, device=c.device,
                                 runtime=c.runtime, precision=c.precision,
                                 allow_precision_mismatch=c.allow_precision_mismatch)

    async def _set_health(self, status: int) -> None:
        """The server's health under "" and raee.v1.Raee, and each task's under its name (once loaded)."""
        if self.health is None:
            raise RuntimeError("health is set before _listen made its servicer")
        for name in self._health_names:
            await self.health.set(name, status)

    # -- stop -----------------------------------------------------------------------------------------------------
    def stop(self, grace: float | None = None) -> None:
        """NOT_SERVING and new calls refused at once; the listener stays up for the notice period (drain_s) while
        in-flight work finishes; then it closes. Everything within `grace` seconds (default grace_s)."""
        if self._stopped.is_set():
            return
        self._stopped.set()
        grace = self.config.grace_s if grace is None else grace
        started = time.monotonic()
        self.admission.draining = True
        self._on_loop(self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING))
        notice = min(self.config.drain_s, grace)
        while (elapsed := time.monotonic() - started) < grace:
            if elapsed >= notice and (self.batcher is None or self.batcher.idle):
                break
            time.sleep(0.02)
        left = max(0.0, grace - (time.monotonic() - started))
        if self.batcher is not None:
            self.batcher.close(timeout=left)
        self._on_loop(self._close_listeners(min(1.0, left)))  # answers already computed still go out
        if self._http is not None:
            self._http.shutdown()
        self._stop_loop()
        self.admission.executor.shutdown(wait=False, cancel_futures=True)
        self._reloads.shutdown(wait=False, cancel_futures=True)
        log.info("stopped")

    async def _close_listeners(self, grace: float) -> None:
        await asyncio.gather(*(listener.stop(grace) for listener in self._listeners))

    def _stop_loop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._loop_thread.join(10)


def check_port_free(host: str, port: int, what: str = "gRPC") -> None:
    """StartupError now if something already listens on host:port (gRPC would say so only in its own log)."""
    if port == 0:
        return
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except OSError:
        return  # gRPC reports an address it cannot resolve
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as gRPC does: TIME_WAIT is no conflict
        try:
            probe.bind(address)
        except OSError as exc:
            raise StartupError(f"cannot listen on {host}:{port} ({what}): {exc.strerror} (another raee-serve?); stop "
                               "it or choose another port") from None


def check_paths(config: ServerConfig) -> None:
    """StoreError or BackboneError now (one line, exit 2) for a store or backbone path that is no store or
    checkpoint at all, rather than a failed load after the listener is up. Full verification comes with loading."""
    from raee.backbones.loading import resolve_source
    from raee.versions import resolve_version
    for store in config.stores:
        resolve_version(store)
    if config.backbone:
        resolve_source(config.backbone)


def main(argv: list[str] | None = None) -> int:
    try:
        config = load_config(argv)
        check_paths(config)
        for host, port, what in ((config.host, config.port, "gRPC"), (config.admin_host, config.admin_port, "admin"),
                                 (config.host, config.metrics_port, "metrics")):
            if port > 0:
                check_port_free(host, port, what)  # before anything else starts: one line and exit 2
        logs.configure(config.log_format, config.log_level)
        log.info("configuration: %s", json.dumps(dataclasses.asdict(config)),
                 extra={"fields": {"configuration": dataclasses.asdict(config)}})
        server = RaeeServer(config).start()
    except RaeeError as exc:
        print(f"raee-serve: error: {exc}", file=sys.stderr)
        return 2
    stopping = threading.Event()

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        log.info("signal %d: draining (notice %.0f s, grace %.0f s)", signum, config.drain_s, config.grace_s)
        stopping.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    server.loaded.wait()
    if server.load_error is not None:
        server.stop(0)
        return 1
    stopping.wait()
    server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
