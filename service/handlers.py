"""The raee.v1.Raee method table: tolerant request parsing, errors to status codes, and a count of every call.

Requests are parsed here rather than by gRPC, so that bytes which are not a valid message become INVALID_ARGUMENT
(counted, one log line) instead of gRPC's INTERNAL with a traceback. Each method's errors pass through
`service.errors.status_for`, the one mapping; a call that ends because its client cancelled or its deadline passed
is counted too.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import grpc
from google.protobuf.message import Message

from service.api import pb
from service.errors import MalformedRequest, message_for, status_for
from service.metrics import ServerMetrics
from service.throttle import SLOWED, RefusalThrottle

if TYPE_CHECKING:
    from service.servicer import RaeeServicer

log = logging.getLogger(__name__)
SERVICE = pb.DESCRIPTOR.services_by_name["Raee"]
# A servicer's methods: a request message (or a stream of them) and the call's context in, the response(s) out.
UnaryMethod = Callable[[Any, grpc.aio.ServicerContext], Awaitable[Message]]
StreamMethod = Callable[[AsyncIterator[Any], grpc.aio.ServicerContext], AsyncIterator[Message]]


@dataclass(frozen=True)
class Malformed:
    """Stands in for a request whose bytes did not parse."""

    error: MalformedRequest


def tolerant_parser(message_type: type[Message]) -> Callable[[bytes], Message | Malformed]:
    def parse(data: bytes) -> Message | Malformed:
        try:
            return message_type.FromString(data)
        except Exception as exc:  # noqa: BLE001 - DecodeError and kin: the client's bytes, not our defect
            return Malformed(MalformedRequest(f"the request is not a valid {message_type.DESCRIPTOR.full_name} "
                                              f"message ({type(exc).__name__}: {exc}); send protobuf-encoded bytes"))
    return parse


def ended_by_caller(context: grpc.aio.ServicerContext) -> str:
    """Why a cancelled call ended: its deadline passed, or its client cancelled."""
    remaining = context.time_remaining()
    return "DEADLINE_EXCEEDED" if remaining is not None and remaining <= 0 else "CANCELLED"


def counted(name: str, metrics: ServerMetrics, throttle: RefusalThrottle) -> Callable[[UnaryMethod], UnaryMethod]:
    """Wrap a unary method: parse failures and raised errors become statuses; every call is counted by code; a
    client that keeps sending what gets refused hears of it late (service.throttle)."""
    def wrap(method: UnaryMethod) -> UnaryMethod:
        @functools.wraps(method)
        async def handler(request: Any, context: grpc.aio.ServicerContext) -> Message:
            try:
                if isinstance(request, Malformed):
                    raise request.error
                with metrics.in_flight.labels(name).track_inprogress():
                    response = await method(request, context)
            except asyncio.CancelledError:
                metrics.requests.labels(name, ended_by_caller(context)).inc()
                raise
            except Exception as exc:  # noqa: BLE001 - every error leaves as a status, never as a crash
                status = report(name, exc)
                metrics.requests.labels(name, status.name).inc()  # counted before the caller hears of it
                await slow_down(throttle, metrics, status, context.peer())
                await context.abort(status, message_for(exc, status))
            metrics.requests.labels(name, "OK").inc()
            return response
        return handler
    return wrap


def counted_stream(name: str, metrics: ServerMetrics) -> Callable[[StreamMethod], StreamMethod]:
    """Wrap a response-streaming method the same way; errors that end the whole stream are counted once."""
    def wrap(method: StreamMethod) -> StreamMethod:
        @functools.wraps(method)
        async def handler(requests: AsyncIterator[Any], context: grpc.aio.ServicerContext) -> AsyncIterator[Message]:
            try:
                with metrics.in_flight.labels(name).track_inprogress():
                    async for response in method(requests, context):
                        yield response
            except asyncio.CancelledError:
                metrics.requests.labels(name, ended_by_caller(context)).inc()
                raise
            except Exception as exc:  # noqa: BLE001
                status = report(name, exc)
                metrics.requests.labels(name, status.name).inc()
                await context.abort(status, message_for(exc, status))
            metrics.requests.labels(name, "OK").inc()
        return handler
    return wrap


async def slow_down(throttle: RefusalThrottle, metrics: ServerMetrics, status: grpc.StatusCode, client: str) -> None:
    """Wait before refusing a client that keeps sending what gets refused (service.throttle)."""
    if status in SLOWED:
        pause = throttle.pause_for(client)
        if pause:
            metrics.slowed_refusals.inc()
            await asyncio.sleep(pause)


def report(name: str, exc: BaseException) -> grpc.StatusCode:
    """The status of an error, logged: one line for bad bytes, a traceback for a defect."""
    status = status_for(exc)
    if status == grpc.StatusCode.INTERNAL:
        log.error("%s failed", name, exc_info=exc)
    elif isinstance(exc, MalformedRequest):
        log.warning("%s: %s", name, exc)
    return status


def raee_handler(servicer: RaeeServicer, metrics: ServerMetrics) -> grpc.GenericRpcHandler:
    """The generic handler serving raee.v1.Raee with `servicer`'s async methods."""
    def unary(name: str, request_type: type[Message], response_type: type[Message]) -> grpc.RpcMethodHandler:
        return grpc.unary_unary_rpc_method_handler(
            counted(name, metrics, servicer.throttle)(getattr(servicer, name)),
            request_deserializer=tolerant_parser(request_type),
            response_serializer=response_type.SerializeToString)

    methods = {
        "Classify": unary("Classify", pb.ClassifyRequest, pb.ClassifyResponse),
        "GetInfo": unary("GetInfo", pb.GetInfoRequest, pb.GetInfoResponse),
        "ReloadStore": unary("ReloadStore", pb.ReloadStoreRequest, pb.ReloadStoreResponse),
        "ClassifyStream": grpc.stream_stream_rpc_method_handler(
            counted_stream("ClassifyStream", metrics)(servicer.ClassifyStream),
            request_deserializer=tolerant_parser(pb.ClassifyRequest),
            response_serializer=pb.ClassifyResponse.SerializeToString),
    }
    if set(methods) != set(SERVICE.methods_by_name):  # the proto gained a method: serve it here too
        raise RuntimeError(f"raee.v1.Raee methods {sorted(SERVICE.methods_by_name)}, handlers {sorted(methods)}")
    return grpc.method_handlers_generic_handler(SERVICE.full_name, methods)
