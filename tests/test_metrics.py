"""The Prometheus page as an operator reads it: process metrics beside raee's own, the store version per task,
per-task latency, calls in flight, the engine's time per batch, an exit-layer histogram sized by the depth counting
only retrieval-chosen exits, names without repeated prefixes, no *_created series and no double-counting stage."""

from __future__ import annotations

import re
import threading
import time
import urllib.request

import grpc

from service.api import pb, pb_grpc
from service.client import Client
from service.launch import metric_values


def scrape(server) -> str:
    return urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics", timeout=10).read().decode()


def value(text: str, series: str) -> float:
    values = metric_values(text)
    assert series in values, f"{series} not on the page"
    return values[series]


def test_metrics_page(serve, stores):
    server = serve()
    with Client(f"127.0.0.1:{server.port}") as client:
        version = client.info().tasks[0].store_version
        client.classify(["good film", "dull plot"], task="sst2")  # calibrated: counted in the exit histogram
        client.classify(["good film"], task="sst2", policy="raee")
        client.classify(["good film"] * 3, task="sst2", policy="full")  # overrides: not counted there
        client.classify(["good film"], task="sst2", policy="static:1")
    text = scrape(server)
    assert value(text, "process_resident_memory_bytes") > 0 and "python_info{" in text
    assert value(text, f'raee_store_info{{task="sst2",version="{version}"}}') == 1
    assert value(text, 'raee_request_seconds_count{task="sst2"}') == 4
    assert value(text, 'raee_exit_layer_count{task="sst2"}') == 3  # 2 calibrated + 1 raee texts, not 4 overrides
    buckets = re.findall(r'^raee_exit_layer_bucket\{le="([^"]+)",task="sst2"\}', text, re.M)
    assert buckets == ["0.0", "1.0", "2.0", "3.0", "+Inf"]  # the tiny backbone's 3 layers, not 50 fixed buckets
    assert value(text, 'raee_retrieval_texts_total{task="sst2"}') == 3
    assert 'raee_in_flight_requests{method="Classify"} 0.0' in text
    assert "_created" not in text and "raee_raee_" not in text
    batches = value(text, "raee_batch_size_count")
    assert batches >= 4 and value(text, "raee_batch_seconds_count") == batches  # one engine time per batch run
    assert 0 < value(text, "raee_batch_seconds_sum") < value(text, 'raee_request_seconds_sum{task="sst2"}')
    stages = set(re.findall(r'^raee_stage_seconds_count\{stage="(\w+)"\}', text, re.M))
    assert stages == {"queue", "key", "search", "backbone"}  # no "total": it would double-count a sum


def test_store_info_follows_a_reload_and_in_flight_counts_calls(serve, stores):
    server = serve(max_wait_ms=800, wait_for_new_clients=True)  # a lone request waits for company: it stays
    # in flight for a while
    with Client(f"127.0.0.1:{server.admin_port}", timeout=60) as admin:
        reloaded = admin.reload("sst2", stores["next"])
    text = scrape(server)
    assert value(text, f'raee_store_info{{task="sst2",version="{reloaded.store_version}"}}') == 1
    assert f'version="{reloaded.previous_version}"' not in text  # one series per task: the serving version
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        future = pb_grpc.RaeeStub(channel).Classify.future(pb.ClassifyRequest(task="sst2", texts=["good"]),
                                                           timeout=10)
        seen = threading.Event()
        # polled while the call is unanswered (it waits 800 ms for company), not 50 times: on a loaded machine 50
        # scrapes could all come before the call reached the server
        while not future.done():
            if 'raee_in_flight_requests{method="Classify"} 1.0' in scrape(server):
                seen.set()
                break
            time.sleep(0.005)  # the scrapes must not take the server's core
        future.result()
    assert seen.is_set()
    assert 'raee_in_flight_requests{method="Classify"} 0.0' in scrape(server)
