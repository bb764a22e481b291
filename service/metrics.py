"""Prometheus metrics of one server, in a registry of its own (several servers can share a process in tests), with
the standard process and platform collectors beside raee's own. No `*_created` series: they double every counter
and histogram and say nothing a scrape needs."""

from __future__ import annotations

import threading
from wsgiref.simple_server import WSGIServer

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    GCCollector,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    disable_created_metrics,
    start_http_server,
)

LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
STAGES = ("queue", "key", "search", "backbone")  # parts of a request; their sum is not the request's latency

disable_created_metrics()  # type: ignore[no-untyped-call]  # prometheus_client leaves it unannotated


class ServerMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        ProcessCollector(registry=r)  # process_cpu_seconds_total, process_resident_memory_bytes, open fds, ...
        PlatformCollector(registry=r)  # python_info
        GCCollector(registry=r)  # python_gc_*
        self.requests = Counter("raee_requests", "RPCs finished, by method and status code", ["method", "code"],
                                registry=r)
        self.in_flight = Gauge("raee_in_flight_requests", "RPCs in progress, by method (streams count once)",
                               ["method"], registry=r)
        self.request_seconds = Histogram("raee_request_seconds", "Classify latency from receipt to answer, by task "
                                         "(requests answered)", ["task"], buckets=LATENCY_BUCKETS, registry=r)
        self.stage_seconds = Histogram("raee_stage_seconds", "Time per stage of a Classify request (queue, key, "
                                       "search, backbone); raee_request_seconds is the whole", ["stage"],
                                       buckets=LATENCY_BUCKETS, registry=r)
        self.store_info = Gauge("raee_store_info", "1 for the store version serving each task", ["task", "version"],
                                registry=r)
        self.full_depth_fallbacks = Counter("raee_full_depth_fallbacks",
                                            "Retrieval texts sent to full depth because no neighbour had an exit "
                                            "record", ["task"], registry=r)
        self.off_domain = Counter("raee_off_domain_fallbacks",
                                  "Texts the off-domain gate sent to full depth, by reason (far, disagree, shifted)",
                                  ["task", "reason"], registry=r)
        self.retrieval_texts = Counter("raee_retrieval_texts", "Texts whose exit a retrieval policy (calibrated or "
                                       "RAEE) chose", ["task"], registry=r)
        self.truncated_texts = Counter("raee_truncated_texts", "Texts cut to the backbone's token limit because "
                                       "their request asked to truncate", ["task"], registry=r)
        self.batch_size = Histogram("raee_batch_size", "Rows per backbone batch",
                                    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256), registry=r)
        self.batch_seconds = Histogram("raee_batch_seconds", "Time the engine spent on each backbone batch (key, "
                                       "search and layers); its rate is the share of time the engine is busy",
                                       buckets=LATENCY_BUCKETS, registry=r)
        self.queue_depth = Gauge("raee_queue_depth", "Texts admitted and not yet answered (max_queue bounds it)",
                                 registry=r)
        self.stream_messages = Counter("raee_stream_messages", "ClassifyStream requests answered, by status code",
                                       ["code"], registry=r)
        self.slowed_refusals = Counter("raee_slowed_refusals", "Refusals answered late because their client keeps "
                                       "sending what gets refused (service/throttle.py)", registry=r)
        self.held_calls = Counter("raee_held_calls", "Calls held until the time their connection was told to come back "
                                  "after a full-queue refusal (service/throttle.py)", registry=r)
        self.exit_layer: Histogram | None = None  # made once the backbone's depth is known (depth)
        self._versions: dict[str, str] = {}
        self._lock = threading.Lock()

    def depth(self, num_layers: int) -> Histogram:
        """The exit-layer histogram, sized by the backbone when first asked for: one bucket per layer,
        0 (embeddings) .. num_layers."""
        if self.exit_layer is None:
            self.exit_layer = Histogram("raee_exit_layer", "Exit layer a retrieval policy (calibrated or RAEE) "
                                        "chose for each text; FULL and STATIC overrides are not counted", ["task"],
                                        buckets=tuple(range(num_layers + 1)), registry=self.registry)
        return self.exit_layer

    def serving(self, task: str, version: str) -> None:
        """raee_store_info{task, version} = 1 for the version now serving the task, its previous series gone."""
        with self._lock:
            previous = self._versions.get(task)
            if previous is not None and previous != version:
                self.store_info.remove(task, previous)
            self._versions[task] = version
            self.store_info.labels(task, version).set(1)

    def serve(self, port: int, host: str = "0.0.0.0") -> tuple[WSGIServer, threading.Thread]:
        """Start the HTTP exposition server; returns (http server, thread)."""
        return start_http_server(port, addr=host, registry=self.registry)
