"""The raee.v1.Raee method table: tolerant request parsing, errors to status codes, and a count of every call.

Requests are parsed here rather than by gRPC, so that bytes which are not a valid message become INVALID_ARGUMENT
(counted, one log line) instead of gRPC's INTERNAL with a traceback. Each method's errors pass through
`service.errors.status_for`, the one mapping; a call that ends because its client cancelled or its deadline passed
is counted too.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
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
UNREAD_ANSWERS = 8  # answers a stream's client may hold unread, each worth stream_idle_s more to the next write
WRITE_WAITED_S = 0.05  # a write that took longer waited for the client's flow-control window
EXTRA_FIELDS = 32  # top-level fields a request may hold beyond max_texts texts: its settings, with room to spare
# A servicer's methods: a request message (or a stream of them) and the call's context in, the response(s) out.
UnaryMethod = Callable[[Any, grpc.aio.ServicerContext], Awaitable[Message]]
StreamMethod = Callable[[AsyncIterator[Any], grpc.aio.ServicerContext], AsyncGenerator[Message, None]]
StreamHandler = Callable[[AsyncIterator[Any], grpc.aio.ServicerContext], Awaitable[None]]  # writes its responses


@dataclass(frozen=True)
class Malformed:
    """Stands in for a request whose bytes did not parse."""

    error: MalformedRequest


def tolerant_parser(message_type: type[Message], max_fields: int,
                    too_many: str = "") -> Callable[[bytes], Message | Malformed]:
    """Parse a request's bytes on the event loop, refusing unparsed a message of more than max_fields top-level
    fields or of bytes that do not walk as protobuf fields (protobuf groups included, which this API never uses
    and the parser would accept as unknown fields): parsing runs before any check, and a 4 MB request of a
    million one-byte texts took 0.2 s to parse, during which no other call was served."""
    def parse(data: bytes) -> Message | Malformed:
        fields = top_level_fields(data, max_fields)
        if fields > max_fields:
            return Malformed(MalformedRequest(f"the request holds more than {max_fields} fields"
                                              f"{too_many or f'; a {message_type.DESCRIPTOR.name} has fewer'}"))
        if fields < 0:
            return Malformed(MalformedRequest(f"the request is not a valid {message_type.DESCRIPTOR.full_name} "
                                              "message (a field is cut short, or is a protobuf group); send "
                                              "protobuf-encoded bytes"))
        try:
            return message_type.FromString(data)
        except Exception as exc:  # noqa: BLE001 - DecodeError and kin: the client's bytes, not our defect
            return Malformed(MalformedRequest(f"the request is not a valid {message_type.DESCRIPTOR.full_name} "
                                              f"message ({type(exc).__name__}: {exc}); send protobuf-encoded bytes"))
    return parse


def top_level_fields(data: bytes, stop_after: int) -> int:
    """How many top-level fields a protobuf message's bytes hold, counted no further than stop_after + 1 (a few
    microseconds per field, whatever the message's size); -1 for bytes that are not well-formed or hold a group."""
    at, count = 0, 0
    while at < len(data) and count <= stop_after:
        key, at = _varint(data, at)
        wire = key & 7
        if at < 0 or wire not in (0, 1, 2, 5):
            return -1
        if wire == 0:
            _, at = _varint(data, at)
        elif wire == 2:
            length, at = _varint(data, at)
            at = at + length if at >= 0 else -1
        else:
            at += 8 if wire == 1 else 4
        if at < 0 or at > len(data):
            return -1
        count += 1
    return count


def _varint(data: bytes, at: int) -> tuple[int, int]:
    """(value, the index after it) of the varint at `at`; (0, -1) if it does not end within 10 bytes or the data."""
    value = 0
    for shift in range(0, 70, 7):
        if at >= len(data):
            break
        byte = data[at]
        at += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, at
    return 0, -1


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


def counted_stream(name: str, metrics: ServerMetrics,
                   read_within_s: float) -> Callable[[StreamMethod], StreamHandler]:
    """Wrap a response-streaming method the same way; errors that end the whole stream are counted once. Each
    response is written with a time limit, so that a client that reads nothing cannot hold a stream slot and the
    answers queued for it forever: the stream ends (counted UNAVAILABLE) when a write waits longer than
    read_within_s for each answer the client may hold unread (the writes that went through without waiting, up to
    UNREAD_ANSWERS) and one more. gRPC hands the server no sign of the client's reads, only of its flow-control
    window: a client reading one large answer every few seconds still leaves the next write waiting until it has
    read through what its buffers hold. Such a stream is cancelled, not ended with a status: a status would wait
    behind the unread answers, and the call with them, until the client went away."""
    def wrap(method: StreamMethod) -> StreamHandler:
        @functools.wraps(method)
        async def handler(requests: AsyncIterator[Any], context: grpc.aio.ServicerContext) -> None:
            unread_cut = False
            try:
                with metrics.in_flight.labels(name).track_inprogress():
                    unread = 0  # answers written without waiting: the client may not have read them yet
                    async with contextlib.aclosing(method(requests, context)) as responses:
                        async for response in responses:
                            limit = read_within_s * (1 + min(unread, UNREAD_ANSWERS))
                            started = time.monotonic()
                            try:
                                await asyncio.wait_for(context.write(response), limit)
                            except asyncio.TimeoutError:
                                unread_cut = True
                                metrics.requests.labels(name, "UNAVAILABLE").inc()
                                log.info("%s from %s: no answer taken for %g s (stream_idle_s); the stream is "
                                         "cancelled", name, context.peer(), limit)
                                raise asyncio.CancelledError from None  # gRPC cancels the call: RST_STREAM
                            if time.monotonic() - started < WRITE_WAITED_S:
                                unread += 1
            except asyncio.CancelledError:
                if not unread_cut:
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
    # a request holds at most max_texts texts and a few settings; more fields are refused before parsing (and a
    # request of max_texts + 1 to max_fields texts by admission, with the limit named)
    max_fields = servicer.config.max_texts + EXTRA_FIELDS
    too_many = f": too many texts in one request; the limit is {servicer.config.max_texts}"

    def unary(name: str, request_type: type[Message], response_type: type[Message]) -> grpc.RpcMethodHandler:
        return grpc.unary_unary_rpc_method_handler(
            counted(name, metrics, servicer.throttle)(getattr(servicer, name)),
            request_deserializer=tolerant_parser(request_type, max_fields,
                                                 too_many if request_type is pb.ClassifyRequest else ""),
            response_serializer=response_type.SerializeToString)

    methods = {
        "Classify": unary("Classify", pb.ClassifyRequest, pb.ClassifyResponse),
        "GetInfo": unary("GetInfo", pb.GetInfoRequest, pb.GetInfoResponse),
        "ReloadStore": unary("ReloadStore", pb.ReloadStoreRequest, pb.ReloadStoreResponse),
        "ClassifyStream": grpc.stream_stream_rpc_method_handler(
            counted_stream("ClassifyStream", metrics, servicer.config.stream_idle_s)(servicer.ClassifyStream),
            request_deserializer=tolerant_parser(pb.ClassifyRequest, max_fields, too_many),
            response_serializer=pb.ClassifyResponse.SerializeToString),
    }
    if set(methods) != set(SERVICE.methods_by_name):  # the proto gained a method: serve it here too
        raise RuntimeError(f"raee.v1.Raee methods {sorted(SERVICE.methods_by_name)}, handlers {sorted(methods)}")
    return grpc.method_handlers_generic_handler(SERVICE.full_name, methods)
