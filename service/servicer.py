"""The raee.v1.Raee servicer: request -> domain call -> response. Errors map to status codes in `status_for`."""

from __future__ import annotations

import functools
import json
import logging
import queue
import threading
import time

import grpc

from raee import __version__
from raee.errors import InputError, RaeeError, StoreError
from service.batcher import BatchKey, DeadlineExpired, Draining, MicroBatcher, QueueFull
from service.config import ServerConfig
from service.api import pb
from service.api import pb_grpc as raee_pb2_grpc
from service.metrics import ServerMetrics
from service.registry import StoreRegistry

log = logging.getLogger(__name__)


class NotReady(RaeeError):
    """The backbone and stores are still loading."""


class AdminDisabled(RaeeError):
    """ReloadStore is turned off on this server."""


def status_for(exc: BaseException) -> grpc.StatusCode:
    """The one place where errors become status codes."""
    if isinstance(exc, (InputError, ValueError)) and not isinstance(exc, StoreError):
        return grpc.StatusCode.INVALID_ARGUMENT
    if isinstance(exc, QueueFull):
        return grpc.StatusCode.RESOURCE_EXHAUSTED
    if isinstance(exc, (NotReady, Draining)):
        return grpc.StatusCode.UNAVAILABLE
    if isinstance(exc, DeadlineExpired):
        return grpc.StatusCode.DEADLINE_EXCEEDED
    if isinstance(exc, StoreError):
        return grpc.StatusCode.FAILED_PRECONDITION
    if isinstance(exc, AdminDisabled):
        return grpc.StatusCode.PERMISSION_DENIED
    return grpc.StatusCode.INTERNAL


def rpc(method):
    """Count every call by status code; turn raised errors into an abort with a message a person can act on."""
    @functools.wraps(method)
    def wrapper(self, request, context):
        try:
            response = method(self, request, context)
            self.metrics.requests.labels(method.__name__, "OK").inc()
            return response
        except Exception as exc:  # noqa: BLE001 - every error leaves as a status, never as a crash
            code = status_for(exc)
            if code == grpc.StatusCode.INTERNAL:
                log.exception("%s failed", method.__name__)
            self.metrics.requests.labels(method.__name__, code.name).inc()
            message = str(exc) if code != grpc.StatusCode.INTERNAL else "internal error; see the server log"
            context.abort(code, message)
    return wrapper


POLICIES = {pb.POLICY_KIND_UNSPECIFIED: "raee", pb.POLICY_KIND_RAEE: "raee", pb.POLICY_KIND_FULL: "full"}


class RaeeServicer(raee_pb2_grpc.RaeeServicer):
    def __init__(self, config: ServerConfig, metrics: ServerMetrics) -> None:
        self.config, self.metrics = config, metrics
        self.registry: StoreRegistry | None = None
        self.batcher: MicroBatcher | None = None

    def ready(self, registry: StoreRegistry, batcher: MicroBatcher) -> None:
        self.registry, self.batcher = registry, batcher

    # -- requests -> domain ----------------------------------------------------------------------------------
    def _key(self, request: pb.ClassifyRequest) -> BatchKey:
        if self.registry is None:
            raise NotReady("the server is still loading its backbone and stores; retry shortly")
        engine = self.registry.get(request.task)
        self.batcher.check_room(len(request.texts))  # refuse overload before the costlier checks below
        if not request.texts:
            raise InputError("no texts given")
        if len(request.texts) > self.config.max_texts:
            raise InputError(f"{len(request.texts)} texts in one request; the limit is {self.config.max_texts}")
        for i, text in enumerate(request.texts):
            if len(text.encode("utf-8")) > self.config.max_text_bytes:
                raise InputError(f"text {i} is {len(text.encode('utf-8'))} bytes; the limit is "
                                 f"{self.config.max_text_bytes}")
        engine.backbone.check_prompts(list(request.texts), engine.task)
        if request.policy == pb.POLICY_KIND_STATIC:
            if request.static_layer > engine.num_layers:
                raise InputError(f"static_layer {request.static_layer} is past the last layer ({engine.num_layers})")
            policy = f"static:{request.static_layer}"
        elif request.policy in POLICIES:
            policy = POLICIES[request.policy]
        else:
            raise InputError(f"unknown policy {request.policy}; use RAEE, FULL or STATIC")
        if request.k > 1024:
            raise InputError(f"k {request.k} is out of range 1..1024 (0 = the store's k)")
        return BatchKey(request.task, policy, request.k or None, request.return_neighbours)

    def _submit(self, request: pb.ClassifyRequest, context):
        key = self._key(request)  # raises NotReady before the batcher exists
        remaining = time_left(context)
        deadline = time.monotonic() + remaining if remaining is not None else None
        return self.batcher.submit(key, list(request.texts), deadline), time.perf_counter()

    def _response(self, request: pb.ClassifyRequest, future, received: float, timeout: float | None):
        try:
            outcome = future.result(timeout=timeout)
        except TimeoutError:
            future.cancel()
            raise DeadlineExpired("the deadline passed before the batch finished") from None
        total_ms = (time.perf_counter() - received) * 1e3
        times = outcome.results[0].times
        for stage, ms in (("queue", outcome.queue_ms), ("key", times.key_ms), ("search", times.search_ms),
                          ("backbone", times.backbone_ms), ("total", total_ms)):
            self.metrics.stage_seconds.labels(stage).observe(ms / 1e3)
        for r in outcome.results:
            self.metrics.exit_layer.labels(request.task).observe(r.exit_layer)
        if future_policy_is_raee(request):
            self.metrics.raee_texts.labels(request.task).inc(len(outcome.results))
            self.metrics.full_depth_fallbacks.labels(request.task).inc(
                sum(r.full_depth_fallback for r in outcome.results))
        return pb.ClassifyResponse(
            results=[pb.Classification(
                label=r.label, label_index=r.label_index, scores=r.scores, exit_layer=r.exit_layer,
                num_layers=r.num_layers, layers_run=r.layers_run,
                neighbours=[pb.Neighbour(id=n.id, similarity=n.similarity) for n in r.neighbours])
                for r in outcome.results],
            timings=pb.StageTimings(queue_ms=outcome.queue_ms, key_ms=times.key_ms, search_ms=times.search_ms,
                                    backbone_ms=times.backbone_ms, total_ms=total_ms),
            store_version=outcome.store_version, request_id=request.request_id)

    # -- RPCs -----------------------------------------------------------------------------------------------
    @rpc
    def Classify(self, request, context):
        future, received = self._submit(request, context)
        return self._response(request, future, received, time_left(context))

    def ClassifyStream(self, request_iterator, context):
        """Requests are read ahead and queued as they arrive; responses leave in request order."""
        pending: queue.Queue = queue.Queue(maxsize=max(4, self.config.max_batch))
        done, finished = object(), threading.Event()

        def put(item) -> bool:
            while not finished.is_set():  # the stream may end (abort, client gone) while we wait for room
                try:
                    pending.put(item, timeout=0.2)
                    return True
                except queue.Full:
                    continue
            return False

        def read() -> None:
            try:
                for request in request_iterator:
                    if finished.is_set():
                        return
                    try:
                        submitted = (request, *self._submit(request, context), None)
                    except Exception as exc:  # noqa: BLE001 - reported in order, below
                        put((request, None, None, exc))
                        return
                    if not put(submitted):
                        return
            except Exception:  # the client went away
                pass
            finally:
                put(done)

        threading.Thread(target=read, name="raee-stream-reader", daemon=True).start()
        try:
            yield from self._stream_responses(pending, done, context)
        finally:
            finished.set()

    def _stream_responses(self, pending: queue.Queue, done, context):
        while (item := pending.get()) is not done:
            request, future, received, error = item
            try:
                if error is not None:
                    raise error
                response = self._response(request, future, received, time_left(context))
            except Exception as exc:  # noqa: BLE001
                code = status_for(exc)
                self.metrics.requests.labels("ClassifyStream", code.name).inc()
                if code == grpc.StatusCode.INTERNAL:
                    log.exception("ClassifyStream failed")
                context.abort(code, str(exc) if code != grpc.StatusCode.INTERNAL else "internal error")
            yield response
        self.metrics.requests.labels("ClassifyStream", "OK").inc()

    @rpc
    def GetInfo(self, request, context):
        if self.registry is None:
            raise NotReady("the server is still loading its backbone and stores; retry shortly")
        b = self.registry.backbone.identity()
        c = self.config
        return pb.GetInfoResponse(
            backbone=pb.BackboneInfo(source=b["source"], kind=b["kind"], num_layers=b["num_layers"],
                                     fingerprint=b["fingerprint"], dtype=b["dtype"]),
            tasks=[pb.TaskInfo(name=e.task.name, labels=list(e.task.labels), store_version=e.store.version,
                               store_path=str(e.store.path), manifest_json=json.dumps(e.store.manifest.to_dict()))
                   for e in self.registry.engines()],
            limits=pb.ServerLimits(max_texts=c.max_texts, max_text_bytes=c.max_text_bytes, max_batch=c.max_batch,
                                   max_wait_ms=c.max_wait_ms, max_queue=c.max_queue),
            version=__version__)

    @rpc
    def ReloadStore(self, request, context):
        if not self.config.admin:
            raise AdminDisabled("ReloadStore is disabled on this server (admin: false)")
        if self.registry is None:
            raise NotReady("the server is still loading; retry shortly")
        if not request.store_path:
            raise InputError("store_path is empty")
        previous, current = self.registry.reload(request.task, request.store_path)
        return pb.ReloadStoreResponse(task=request.task, previous_version=previous, store_version=current)


def time_left(context) -> float | None:
    """Seconds until the call's deadline; None without one (gRPC reports no deadline as an enormous number)."""
    remaining = context.time_remaining() if context is not None else None
    return remaining if remaining is not None and remaining < 86400 else None


def future_policy_is_raee(request: pb.ClassifyRequest) -> bool:
    return request.policy in (pb.POLICY_KIND_UNSPECIFIED, pb.POLICY_KIND_RAEE)
