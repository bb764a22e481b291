"""The raee.v1.Raee methods: request -> domain call -> core -> response. Errors are raised, never handled here:
service.handlers turns them into status codes (service.errors.status_for) and counts every call."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator

import grpc

from service import convert, logs
from service.admission import Admission
from service.api import pb
from service.batcher import BatchOutcome
from service.config import ServerConfig
from service.errors import QueueFull, message_for, status_for
from service.handlers import Malformed, slow_down
from service.metrics import STAGES, ServerMetrics
from service.reload import Reloader, ReloadGuard
from service.streams import StreamSlots, answer_in_order
from service.throttle import PUSHBACK_TRAILER, Pushback, RefusalThrottle

log = logging.getLogger("raee-serve")


class RaeeServicer:
    """One listener's view of the server: the shared admission, streams and reloader, and this listener's guard."""

    def __init__(self, config: ServerConfig, metrics: ServerMetrics, admission: Admission, streams: StreamSlots,
                 guard: ReloadGuard, throttle: RefusalThrottle, pushback: Pushback) -> None:
        self.config, self.metrics, self.admission, self.streams, self.guard = config, metrics, admission, streams, guard
        self.throttle = throttle  # shared by every listener: slows clients that keep getting refused
        self.pushback = pushback  # shared too: when each client refused for a full queue may come back
        self.reloader: Reloader | None = None  # set once the stores are loaded

    async def Classify(self, request: pb.ClassifyRequest, context: grpc.aio.ServicerContext) -> pb.ClassifyResponse:
        rid = logs.request_id(context.invocation_metadata(), request.request_id)
        context.set_trailing_metadata(((logs.REQUEST_ID, rid),))  # errors carry it too
        try:
            return await self._classify(request, context, rid)
        except QueueFull as exc:  # gRPC clients with a retry policy wait as told
            if exc.retry_after_s is not None:
                context.set_trailing_metadata(((logs.REQUEST_ID, rid),
                                               (PUSHBACK_TRAILER, str(round(exc.retry_after_s * 1e3)))))
            raise

    async def _classify(self, request: pb.ClassifyRequest, context: grpc.aio.ServicerContext,
                        rid: str) -> pb.ClassifyResponse:
        """One request, answered and logged (one line, errors included)."""
        received = time.perf_counter()
        call = None
        client = context.peer()
        try:
            call = convert.classify_call(request)
            deadline = deadline_of(context)
            try:
                await self.pushback.wait_turn(client, deadline)
                outcome = await self.admission.classify(call, client, deadline)
            except QueueFull as exc:
                wait = self.pushback.refused(client)
                raise QueueFull(f"{exc}; come back in {wait * 1e3:.0f} ms or later", retry_after_s=wait) from None
        except BaseException as exc:
            code = "CANCELLED" if isinstance(exc, asyncio.CancelledError) else status_for(exc).name
            logs.log_request(rid, request.task, len(request.texts), str(call.policy) if call else "-", [], 0,
                             (time.perf_counter() - received) * 1e3, code)
            raise
        self.pushback.admitted(client)
        self._observe(call, outcome, received)
        total_ms = (time.perf_counter() - received) * 1e3
        logs.log_request(rid, call.task, len(call.texts), str(call.policy), [r.exit_layer for r in outcome.results],
                         outcome.results[0].num_layers, total_ms, "OK", sum(r.truncated for r in outcome.results))
        return convert.classify_response(call, outcome, total_ms)

    async def ClassifyStream(self, requests: AsyncIterator[pb.ClassifyRequest | Malformed],
                             context: grpc.aio.ServicerContext) -> AsyncGenerator[pb.ClassifyResponse, None]:
        self.admission.check_open()
        async with self.streams.slot():
            async for response in answer_in_order(requests, lambda r: self._stream_answer(r, context),
                                                  window=self.config.max_batch, idle_s=self.config.stream_idle_s):
                yield response

    async def _stream_answer(self, request: pb.ClassifyRequest | Malformed,
                             context: grpc.aio.ServicerContext) -> pb.ClassifyResponse:
        """One stream request's response: its results, or its own error; the stream goes on either way."""
        request_id = getattr(request, "request_id", "")
        try:
            if not isinstance(request, pb.ClassifyRequest):
                raise request.error  # bytes that did not parse (service.handlers.Malformed)
            response = await self._classify(request, context, logs.request_id(None, request.request_id))
            self.metrics.stream_messages.labels("OK").inc()
            return response
        except Exception as exc:  # noqa: BLE001 - answered in the stream, see convert.error_response
            response = convert.error_response(exc, request_id)
            self.metrics.stream_messages.labels(response.error.code_name).inc()
            await slow_down(self.throttle, self.metrics, status_for(exc), context.peer())
            return response

    async def GetInfo(self, request: pb.GetInfoRequest, context: grpc.aio.ServicerContext) -> pb.GetInfoResponse:
        registry, _ = self.admission.check_open()
        return convert.info_response(registry, self.config)

    async def ReloadStore(self, request: pb.ReloadStoreRequest,
                          context: grpc.aio.ServicerContext) -> pb.ReloadStoreResponse:
        try:
            self.guard.check(context.invocation_metadata())
            self.admission.check_open()
            if self.reloader is None:  # set before the admission opens (RaeeServer._load)
                raise RuntimeError("the reloader is missing from an open server")
            previous, current = await self.reloader.reload(request.task, request.store_path, deadline_of(context),
                                                           request.version)
            self.metrics.serving(request.task, current)
        except Exception as exc:
            log.warning("reload of task %s from %s refused (%s): %s", logs.printable(request.task, 100),
                        logs.printable(request.store_path, 300), status_for(exc).name,
                        message_for(exc, status_for(exc)))
            raise
        return pb.ReloadStoreResponse(task=request.task, previous_version=previous, store_version=current)

    def _observe(self, call: convert.ClassifyCall, outcome: BatchOutcome, received: float) -> None:
        times = outcome.results[0].times
        for stage, ms in zip(STAGES, (outcome.queue_ms, times.key_ms, times.search_ms, times.backbone_ms)):
            self.metrics.stage_seconds.labels(stage).observe(ms / 1e3)
        self.metrics.request_seconds.labels(call.task).observe(time.perf_counter() - received)
        if call.truncate:
            self.metrics.truncated_texts.labels(call.task).inc(sum(r.truncated for r in outcome.results))
        if call.policy.uses_neighbours:  # calibrated or RAEE: the exits retrieval chose
            exit_layer = self.metrics.depth(outcome.results[0].num_layers)
            for r in outcome.results:
                exit_layer.labels(call.task).observe(r.exit_layer)
            self.metrics.retrieval_texts.labels(call.task).inc(len(outcome.results))
            self.metrics.full_depth_fallbacks.labels(call.task).inc(
                sum(r.full_depth_fallback for r in outcome.results))
            for r in outcome.results:
                if r.off_domain:
                    self.metrics.off_domain.labels(call.task, r.off_domain).inc()


def deadline_of(context: grpc.aio.ServicerContext) -> float | None:
    """The call's deadline as a time.monotonic() value; None without one."""
    remaining = context.time_remaining()
    return time.monotonic() + remaining if remaining is not None and remaining < 86400 else None
