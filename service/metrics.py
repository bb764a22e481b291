"""Prometheus metrics of one server, in a registry of its own (several servers can share a process in tests)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class ServerMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("raee_requests", "RPCs finished, by method and status code", ["method", "code"],
                                registry=r)
        self.stage_seconds = Histogram("raee_stage_seconds", "Time per stage (queue, key, search, backbone, total)",
                                       ["stage"], buckets=LATENCY_BUCKETS, registry=r)
        self.exit_layer = Histogram("raee_exit_layer", "Exit layer of each classified text", ["task"],
                                    buckets=tuple(range(0, 49)), registry=r)
        self.full_depth_fallbacks = Counter("raee_full_depth_fallbacks",
                                            "Retrieval texts sent to full depth because no neighbour had an exit "
                                            "record", ["task"], registry=r)
        self.off_domain = Counter("raee_off_domain_fallbacks",
                                  "Texts the off-domain gate sent to full depth, by reason (far, disagree, shifted)",
                                  ["task", "reason"], registry=r)
        self.raee_texts = Counter("raee_raee_texts", "Texts classified by a retrieval policy (calibrated or RAEE)",
                                  ["task"], registry=r)
        self.batch_size = Histogram("raee_batch_size", "Rows per backbone batch",
                                    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256), registry=r)
        self.queue_depth = Gauge("raee_queue_depth", "Texts admitted and not yet answered (max_queue bounds it)",
                                 registry=r)
        self.stream_messages = Counter("raee_stream_messages", "ClassifyStream requests answered, by status code",
                                       ["code"], registry=r)
        self.slowed_refusals = Counter("raee_slowed_refusals", "Refusals answered late because their client keeps "
                                       "sending what gets refused (service/throttle.py)", registry=r)

    def serve(self, port: int, host: str = "0.0.0.0"):
        """Start the HTTP exposition server; returns (http server, thread)."""
        return start_http_server(port, addr=host, registry=self.registry)
