"""A typed Python client for raee.v1 (`service.client.Client`): plain dataclasses in and out, UNAVAILABLE retried
with backoff, and a full queue's RESOURCE_EXHAUSTED too, never sooner than the server said to come back."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, TypedDict

import grpc
from google.protobuf.message import Message

from raee.exit_policy import ExitPolicy
from service.api import pb, pb_grpc
from service.policy_wire import to_wire
from service.throttle import PUSHBACK_TRAILER

RETRYABLE = (grpc.StatusCode.UNAVAILABLE,)


class RaeeClientError(Exception):
    """An RPC failed; `code` is the gRPC status code, the message says why."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(f"{code.name}: {message}")
        self.code, self.message = code, message


@dataclass(frozen=True)
class Neighbour:
    id: int
    similarity: float


@dataclass(frozen=True)
class ServedClassification:
    """One text's answer as served (raee.Classification, less the stage times, which come per request)."""

    label: str
    label_index: int
    scores: tuple[float, ...]
    exit_layer: int
    num_layers: int
    layers_run: int
    neighbours: tuple[Neighbour, ...] = ()
    off_domain: str = ""  # "", or why the off-domain gate sent the text to full depth: far, disagree, shifted
    truncated: bool = False  # the text was cut to the backbone's token limit (a request with truncate)


@dataclass(frozen=True)
class Timings:
    queue_ms: float
    key_ms: float
    search_ms: float
    backbone_ms: float
    total_ms: float


@dataclass(frozen=True)
class RequestFailure:
    """Why one request of a stream failed; the stream went on."""

    code: grpc.StatusCode
    message: str


@dataclass(frozen=True)
class ClassifyResult:
    results: tuple[ServedClassification, ...]
    timings: Timings
    store_version: str
    request_id: str = ""
    error: RequestFailure | None = None  # streams only: this request failed (results is empty)


@dataclass(frozen=True)
class TaskInfo:
    name: str
    labels: tuple[str, ...]
    store_version: str
    store_path: str
    manifest: dict[str, Any]  # the store's manifest as JSON (raee.manifest.StoreManifest.to_dict)


class BackboneInfo(TypedDict):
    """The backbone a server runs, as raee.backbones.Backbone.identity() names it."""

    source: str
    kind: str
    num_layers: int
    fingerprint: str
    dtype: str
    runtime: str
    precision: str


class Limits(TypedDict):
    """A server's limits on requests (service.config.ServerConfig) and its backbone's token limit."""

    max_texts: int
    max_text_bytes: int
    max_batch: int
    max_wait_ms: float
    max_queue: int
    max_streams: int
    stream_idle_s: float
    max_tokens: int


@dataclass(frozen=True)
class ServerInfo:
    backbone: BackboneInfo
    tasks: tuple[TaskInfo, ...]
    limits: Limits
    version: str


@dataclass(frozen=True)
class Request:
    """One request of a stream."""

    texts: tuple[str, ...]
    task: str
    policy: ExitPolicy | str = "calibrated"  # calibrated[:k=K], raee[:k=K], full or static:L
    k: int | None = None  # neighbours, overriding the policy's
    neighbours: bool = False
    request_id: str = ""
    truncate: bool = False  # cut texts past the backbone's token limit instead of having them refused


@dataclass(frozen=True)
class ReloadResult:
    task: str
    previous_version: str
    store_version: str


def _request(r: Request) -> pb.ClassifyRequest:
    policy = ExitPolicy.parse(r.policy)
    return pb.ClassifyRequest(task=r.task, texts=list(r.texts), **to_wire(policy.with_k(r.k)),
                              return_neighbours=r.neighbours, request_id=r.request_id, truncate=r.truncate)


def _status(number: int) -> grpc.StatusCode:
    return next((c for c in grpc.StatusCode if c.value[0] == number), grpc.StatusCode.UNKNOWN)


def _result(response: pb.ClassifyResponse) -> ClassifyResult:
    if response.HasField("error"):
        e = response.error
        return ClassifyResult((), Timings(0.0, 0.0, 0.0, 0.0, 0.0), response.store_version, response.request_id,
                              RequestFailure(_status(e.code), e.message))
    t = response.timings
    return ClassifyResult(
        tuple(ServedClassification(c.label, c.label_index, tuple(c.scores), c.exit_layer, c.num_layers, c.layers_run,
                             tuple(Neighbour(n.id, n.similarity) for n in c.neighbours), c.off_domain,
                             c.truncated)
              for c in response.results),
        Timings(t.queue_ms, t.key_ms, t.search_ms, t.backbone_ms, t.total_ms), response.store_version,
        response.request_id)


def pushback_s(exc: grpc.RpcError) -> float | None:
    """The wait a refusal told its client (gRPC's grpc-retry-pushback-ms trailer, service.throttle): seconds, -1 for
    "do not retry" (a negative or malformed value, as gRPC's retry design reads it), None without the trailer."""
    for key, value in exc.trailing_metadata() or ():
        if key == PUSHBACK_TRAILER:
            text = value.decode() if isinstance(value, bytes) else value
            return int(text) / 1e3 if text.isdigit() else -1.0
    return None


@dataclass
class Client:
    """`Client("localhost:50051").classify(["a fine film"], task="sst2")`."""

    address: str
    timeout: float = 10.0  # seconds per call
    retries: int = 3  # extra attempts after UNAVAILABLE, or RESOURCE_EXHAUSTED that says when to come back
    backoff: float = 0.2  # first wait between attempts, doubled each time; longer if the server says so
    root_certificates: bytes | None = None  # PEM; TLS when given
    private_key: bytes | None = None  # PEM; with certificate_chain, this client's certificate (mutual TLS)
    certificate_chain: bytes | None = None  # PEM
    server_name: str | None = None  # the name the server's certificate must carry, if not the address's host
    stream_timeout: float | None = None  # seconds for a whole stream; None = no deadline
    token: str | None = None  # admin token, sent with ReloadStore as "authorization: Bearer TOKEN"
    _channel: grpc.Channel = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if self.root_certificates is not None:
            credentials = grpc.ssl_channel_credentials(self.root_certificates, self.private_key,
                                                       self.certificate_chain)
            options = [("grpc.ssl_target_name_override", self.server_name)] if self.server_name else []
            self._channel = grpc.secure_channel(self.address, credentials, options=options)
        else:
            self._channel = grpc.insecure_channel(self.address)
        self._stub = pb_grpc.RaeeStub(self._channel)  # type: ignore[no-untyped-call]  # generated, unannotated

    def _call(self, method: Callable[..., Any], request: Message,
              metadata: tuple[tuple[str, str], ...] | None = None) -> Any:
        wait = self.backoff
        for attempt in range(self.retries + 1):
            try:
                return method(request, timeout=self.timeout, metadata=metadata)
            except grpc.RpcError as exc:
                told = pushback_s(exc)  # a full queue says when to come back; other RESOURCE_EXHAUSTED are final
                retry = exc.code() in RETRYABLE or (exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                                                    and told is not None and told >= 0)
                if retry and attempt < self.retries:
                    time.sleep(max(wait, told or 0.0))
                    wait *= 2
                    continue
                raise RaeeClientError(exc.code(), exc.details() or "") from None

    def classify(self, texts: list[str], task: str, *, policy: ExitPolicy | str = "calibrated",
                 k: int | None = None, neighbours: bool = False, truncate: bool = False) -> ClassifyResult:
        """policy: calibrated (the store's, the default), raee, full or static:L; k overrides its neighbours.
        truncate: texts past the backbone's token limit are cut to fit (their results say `truncated`) instead of
        refused with INVALID_ARGUMENT."""
        request = _request(Request(tuple(texts), task, policy, k, neighbours, truncate=truncate))
        return _result(self._call(self._stub.Classify, request))

    def stream(self, requests: Iterable[Request]) -> Iterator[ClassifyResult]:
        """Send requests on one bidirectional stream; one result per request comes back, in order. A request that
        failed comes back with `error` set; the stream goes on."""
        try:
            for response in self._stub.ClassifyStream((_request(r) for r in requests),
                                                          timeout=self.stream_timeout):
                yield _result(response)
        except grpc.RpcError as exc:
            raise RaeeClientError(exc.code(), exc.details() or "") from None

    def info(self) -> ServerInfo:
        r = self._call(self._stub.GetInfo, pb.GetInfoRequest())
        b, lim = r.backbone, r.limits
        return ServerInfo(
            BackboneInfo(source=b.source, kind=b.kind, num_layers=b.num_layers, fingerprint=b.fingerprint,
                         dtype=b.dtype, runtime=b.runtime, precision=b.precision),
            tuple(TaskInfo(t.name, tuple(t.labels), t.store_version, t.store_path, json.loads(t.manifest_json))
                  for t in r.tasks),
            Limits(max_texts=lim.max_texts, max_text_bytes=lim.max_text_bytes, max_batch=lim.max_batch,
                   max_wait_ms=lim.max_wait_ms, max_queue=lim.max_queue, max_streams=lim.max_streams,
                   stream_idle_s=lim.stream_idle_s, max_tokens=lim.max_tokens), r.version)

    def reload(self, task: str, store_path: str, version: str = "") -> ReloadResult:
        """Load the store's CURRENT version, or `version` of it, in place of the one serving."""
        metadata = (("authorization", f"Bearer {self.token}"),) if self.token else None
        r = self._call(self._stub.ReloadStore, pb.ReloadStoreRequest(task=task, store_path=store_path,
                                                                      version=version), metadata)
        return ReloadResult(r.task, r.previous_version, r.store_version)

    def wait_until_serving(self, timeout: float = 120.0) -> None:
        """Block until grpc.health.v1 reports SERVING."""
        from grpc_health.v1 import health_pb2, health_pb2_grpc
        stub = health_pb2_grpc.HealthStub(self._channel)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                status = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=2).status
                if status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.2)
        raise TimeoutError(f"{self.address} not SERVING after {timeout:.0f} s")

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()
