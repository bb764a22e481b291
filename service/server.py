"""raee-serve: the gRPC server. It listens at once with health NOT_SERVING, loads the backbone and stores, warms
them, then turns SERVING. SIGTERM: NOT_SERVING, new requests refused, in-flight work drains, exit."""

from __future__ import annotations

import logging
import signal
import sys
import threading
from collections.abc import Callable
from concurrent import futures

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from raee.backbones import Backbone, load_backbone
from raee.errors import RaeeError
from raee.store import load_store
from service.api import pb as raee_pb2
from service.api import pb_grpc as raee_pb2_grpc
from service.batcher import MicroBatcher
from service.config import ServerConfig, load_config
from service.metrics import ServerMetrics
from service.registry import StoreRegistry
from service.servicer import RaeeServicer

log = logging.getLogger("raee-serve")
SERVICE_NAME = raee_pb2.DESCRIPTOR.services_by_name["Raee"].full_name  # "raee.v1.Raee"


class RaeeServer:
    """One server process: gRPC (Raee, health, reflection) and Prometheus metrics."""

    def __init__(self, config: ServerConfig, backbone: Backbone | Callable[[], Backbone] | None = None) -> None:
        """backbone: a loaded backbone, a function that loads one, or None to load what the stores name."""
        self.config = config
        self.metrics = ServerMetrics()
        self.servicer = RaeeServicer(config, self.metrics)
        self.health = health.HealthServicer()
        self.grpc = grpc.server(futures.ThreadPoolExecutor(max_workers=config.rpc_threads, thread_name_prefix="rpc"),
                                options=[("grpc.max_receive_message_length", 64 * 1024 * 1024)])
        raee_pb2_grpc.add_RaeeServicer_to_server(self.servicer, self.grpc)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.grpc)
        reflection.enable_server_reflection((SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), self.grpc)
        address = f"{config.host}:{config.port}"
        if config.tls_cert:
            with open(config.tls_key, "rb") as key, open(config.tls_cert, "rb") as cert:
                credentials = grpc.ssl_server_credentials([(key.read(), cert.read())])
            self.port = self.grpc.add_secure_port(address, credentials)
        else:
            self.port = self.grpc.add_insecure_port(address)
        self.metrics_port = None
        self._backbone = backbone
        self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        self.loaded = threading.Event()
        self.load_error: BaseException | None = None
        self.batcher: MicroBatcher | None = None

    def _set_health(self, status) -> None:
        for name in ("", SERVICE_NAME):
            self.health.set(name, status)

    def start(self) -> "RaeeServer":
        self.grpc.start()
        if self.config.metrics_port >= 0:
            http, _ = self.metrics.serve(self.config.metrics_port, self.config.host)
            self.metrics_port = http.server_port
            self._http = http
        log.info("listening on %s:%d (metrics on %s), loading", self.config.host, self.port, self.metrics_port)
        threading.Thread(target=self._load, name="raee-load", daemon=True).start()
        return self

    def _load(self) -> None:
        try:
            if isinstance(self._backbone, Backbone):
                backbone = self._backbone
            else:
                backbone = (self._backbone or self._load_backbone)()
            registry = StoreRegistry(backbone, self.config.device)
            for store in self.config.stores:
                registry.add(store)
            self.batcher = MicroBatcher(registry.get, self.config.max_batch, self.config.max_wait_ms,
                                        self.config.max_queue, self.metrics)
            for engine in registry.engines():  # warm: first calls allocate, JIT-dispatch and fill caches
                engine.classify([engine.store.texts[0]])
            self.servicer.ready(registry, self.batcher)
            self._set_health(health_pb2.HealthCheckResponse.SERVING)
            log.info("SERVING tasks %s on %s backbone %s", [e.task.name for e in registry.engines()],
                     backbone.kind, backbone.source)
        except BaseException as exc:  # noqa: BLE001 - reported to the operator, health stays NOT_SERVING
            self.load_error = exc
            log.error("cannot serve: %s", exc)
        finally:
            self.loaded.set()

    def _load_backbone(self) -> Backbone:
        built = load_store(self.config.stores[0]).manifest.backbone
        return load_backbone(self.config.backbone or built.source, kind=built.kind, device=self.config.device,
                             dtype=built.dtype, **built.settings)

    def stop(self, grace: float | None = None) -> None:
        """NOT_SERVING, refuse new RPCs, let in-flight ones finish within the grace period, stop."""
        grace = self.config.grace_s if grace is None else grace
        self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        done = self.grpc.stop(grace)
        if self.batcher is not None:
            self.batcher.close(timeout=grace)
        done.wait(grace + 1)
        if getattr(self, "_http", None) is not None:
            self._http.shutdown()
        log.info("stopped")


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("faiss.loader").setLevel(logging.WARNING)
    try:
        config = load_config(argv)
    except RaeeError as exc:
        print(f"raee-serve: error: {exc}", file=sys.stderr)
        return 2
    server = RaeeServer(config).start()
    stopping = threading.Event()

    def on_signal(signum, _frame) -> None:
        log.info("signal %d: draining (grace %.0f s)", signum, config.grace_s)
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
