"""raee.v1 messages to domain values and back: the one place that knows both the wire and the library's types."""

from __future__ import annotations

import json
from dataclasses import dataclass

from raee import __version__
from raee.exit_policy import ExitPolicy
from service.api import pb
from service.batcher import BatchOutcome
from service.config import ServerConfig
from service.errors import message_for, status_for
from service.policy_wire import from_wire
from service.registry import StoreRegistry


@dataclass(frozen=True)
class ClassifyCall:
    """One Classify request in the library's terms."""

    task: str
    texts: list[str]
    policy: ExitPolicy  # calibrated, raee, full or static:L, with the request's k (if any) folded in
    neighbours: bool  # return each text's neighbours
    request_id: str
    truncate: bool = False  # cut texts past the backbone's token limit instead of refusing them


def classify_call(request: pb.ClassifyRequest) -> ClassifyCall:
    layer = request.static_layer if request.HasField("static_layer") else None
    policy = from_wire(request.policy, layer, request.k)
    return ClassifyCall(request.task, list(request.texts), policy, request.return_neighbours, request.request_id,
                        request.truncate)


def classify_response(call: ClassifyCall, outcome: BatchOutcome, total_ms: float) -> pb.ClassifyResponse:
    times = outcome.results[0].times
    return pb.ClassifyResponse(
        results=[pb.Classification(
            label=r.label, label_index=r.label_index, scores=r.scores, exit_layer=r.exit_layer,
            num_layers=r.num_layers, layers_run=r.layers_run, off_domain=r.off_domain, truncated=r.truncated,
            neighbours=[pb.Neighbour(id=n.id, similarity=n.similarity) for n in r.neighbours])
            for r in outcome.results],
        timings=pb.StageTimings(queue_ms=outcome.queue_ms, key_ms=times.key_ms, search_ms=times.search_ms,
                                backbone_ms=times.backbone_ms, total_ms=total_ms),
        store_version=outcome.store_version, request_id=call.request_id)


def error_response(error: BaseException, request_id: str) -> pb.ClassifyResponse:
    """A stream's answer to one request that failed: its status and request_id, no results."""
    code = status_for(error)
    return pb.ClassifyResponse(request_id=request_id, error=pb.RequestError(
        code=code.value[0], code_name=code.name, message=message_for(error, code)))


def info_response(registry: StoreRegistry, config: ServerConfig) -> pb.GetInfoResponse:
    b = registry.backbone.identity()
    c = config
    return pb.GetInfoResponse(
        backbone=pb.BackboneInfo(source=b["source"], kind=b["kind"], num_layers=b["num_layers"],
                                 fingerprint=b["fingerprint"], dtype=b["dtype"], runtime=b["runtime"],
                                 precision=b["precision"]),
        tasks=[pb.TaskInfo(name=e.task.name, labels=list(e.task.labels), store_version=e.store.version,
                           store_path=str(e.store.path), manifest_json=json.dumps(e.store.manifest.to_dict()))
               for e in registry.engines()],
        limits=pb.ServerLimits(max_texts=c.max_texts, max_text_bytes=c.max_text_bytes, max_batch=c.max_batch,
                               max_wait_ms=c.max_wait_ms, max_queue=c.max_queue, max_streams=c.max_streams,
                               stream_idle_s=c.stream_idle_s, max_tokens=registry.backbone.max_tokens),
        version=__version__)

