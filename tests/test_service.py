"""The gRPC service on 127.0.0.1, port 0, with tiny models: status codes, health, streaming, batching, reload
under traffic, deadlines, metrics, fuzzing and SIGTERM draining. tests/test_attacks.py holds the hostile cases."""

from __future__ import annotations

import gc
import logging
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from raee.build import build_store
from raee.data import read_examples
from raee.engine import Engine
from raee.errors import InputError
from raee.keys import KeySpec
from raee.store import load_store
from raee.tasks import BUILTIN_TASKS
from service.api import pb, pb_grpc
from service.client import Client, RaeeClientError, Request
from service.config import ServerConfig, load_config
from service.launch import metric_values
from service.server import RaeeServer
from tests.waiting import wait_until

TASK = BUILTIN_TASKS["sst2"]
ROOT = Path(__file__).resolve().parents[1]


def start(stores, **overrides) -> RaeeServer:
    config = ServerConfig(**{"stores": (stores["current"],), "host": "127.0.0.1", "port": 0, "metrics_port": 0,
                             "drain_s": 0.0, "admin": True, "admin_port": 0, "store_roots": (stores["root"],),
                             **overrides})
    server = RaeeServer(config, backbone=stores["backbone"]).start()
    server.loaded.wait(60)
    assert server.load_error is None
    return server


@pytest.fixture(scope="module")
def server(stores):
    server = start(stores, max_wait_ms=2.0, max_texts=8, max_text_bytes=200)
    yield server
    server.stop(1)


@pytest.fixture
def client(server):
    with Client(f"127.0.0.1:{server.port}", timeout=10) as c:
        yield c


@pytest.fixture
def admin(server):
    """A client of the admin listener (ReloadStore served there)."""
    with Client(f"127.0.0.1:{server.admin_port}", timeout=30) as c:
        yield c


def code_of(call) -> grpc.StatusCode:
    with pytest.raises(RaeeClientError) as info:
        call()
    return info.value.code


def test_classify_returns_labels_exits_timings_and_version(client, server):
    result = client.classify(["good film", "awful dull plot"], task="sst2", neighbours=True, k=4)
    assert len(result.results) == 2 and result.store_version.startswith("v")
    for r in result.results:
        assert r.label in TASK.labels and r.num_layers == 3  # the values: test_served_results_equal_the_engines
        assert len(r.neighbours) == 4 and sum(r.scores) == pytest.approx(1, abs=1e-5)
    assert result.timings.total_ms > 0 and result.timings.backbone_ms > 0
    full = client.classify(["good film"], task="sst2", policy="full").results[0]
    static = client.classify(["good film"], task="sst2", policy="static:1").results[0]
    assert (full.exit_layer, static.exit_layer, static.layers_run) == (3, 1, 1)


SERVED_TEXTS = ["good film", "awful dull plot", "a gorgeous, witty film", "the plot is boilerplate", "fine",
                "an ugly, pointless movie"]


@pytest.mark.parametrize("policy", ["calibrated", "calibrated:k=8", "raee:k=4", "full", "static:2"])
def test_served_results_equal_the_engines(serve, stores, policy):
    """A fresh server and a fresh Engine on the same store and backbone answer the same texts alike, field by
    field (the off-domain gate's stream test starts from the same state in both)."""
    engine = Engine(load_store(stores["current"]), stores["backbone"])
    expected = engine.classify(SERVED_TEXTS, policy=policy, with_neighbours=True)
    server = serve()
    with Client(f"127.0.0.1:{server.port}", timeout=30) as c:
        served = c.classify(SERVED_TEXTS, task="sst2", policy=policy, neighbours=True).results
    fields = [(r.label, r.label_index, r.exit_layer, r.layers_run, r.num_layers, r.off_domain) for r in served]
    assert fields == [(e.label, e.label_index, e.exit_layer, e.layers_run, e.num_layers, e.off_domain)
                      for e in expected]
    for r, e in zip(served, expected):
        assert r.scores == pytest.approx(e.scores, abs=1e-6)  # float32 on the wire
        assert [n.id for n in r.neighbours] == [n.id for n in e.neighbours]
        assert [n.similarity for n in r.neighbours] == pytest.approx([n.similarity for n in e.neighbours], abs=1e-6)


@pytest.mark.parametrize("call, message", [
    (dict(texts=[], task="sst2"), "no texts"),
    (dict(texts=["good", ""], task="sst2"), "text 1 is empty"),
    (dict(texts=["good " * 60], task="sst2"), "bytes; the limit is 200"),
    (dict(texts=["! " * 70], task="sst2"), "tokens with its prompt"),
    (dict(texts=["good"] * 9, task="sst2"), "9 texts in one request; the limit is 8"),
    (dict(texts=["good"], task="sst2", policy="static:4"), "static layer 4 is past the last layer"),
])
def test_bad_input_is_invalid_argument_with_a_reason(client, call, message):
    with pytest.raises(RaeeClientError) as info:
        client.classify(**call)
    assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert message in info.value.message


OVER_LONG = "a dull film " + "! " * 90  # 192 bytes, within the byte limit; 95 tokens with its prompt, over 64


def test_truncate_cuts_over_long_texts_instead_of_refusing_them(client, server, stores, caplog):
    """Refused without truncate; with it, answered as the Engine answers with truncate (the cut text), marked
    truncated, counted and logged; a text that fits is answered alike either way."""
    assert code_of(lambda: client.classify([OVER_LONG], task="sst2")) == grpc.StatusCode.INVALID_ARGUMENT
    counted = truncated_texts(server)
    with caplog.at_level(logging.INFO, logger="raee-serve.requests"):
        served = client.classify(["good film", OVER_LONG], task="sst2", policy="raee", truncate=True).results
    assert [r.fields["truncated"] for r in caplog.records if r.name == "raee-serve.requests"] == [1]
    expected = Engine(load_store(stores["current"]), stores["backbone"]).classify(["good film", OVER_LONG],
                                                                                  policy="raee", truncate=True)
    assert [r.truncated for r in served] == [False, True] == [e.truncated for e in expected]
    assert [(r.label, r.exit_layer, r.layers_run) for r in served] == [(e.label, e.exit_layer, e.layers_run)
                                                                      for e in expected]
    for r, e in zip(served, expected):
        assert r.scores == pytest.approx(e.scores, abs=1e-6)
    plain = client.classify(["good film"], task="sst2", policy="raee").results[0]
    assert (plain.label, plain.exit_layer, plain.truncated) == (served[0].label, served[0].exit_layer, False)
    assert plain.scores == pytest.approx(served[0].scores, abs=1e-6)
    streamed = list(client.stream([Request((OVER_LONG,), "sst2", truncate=True), Request((OVER_LONG,), "sst2")]))
    assert streamed[0].results[0].truncated and streamed[0].results[0].label == served[1].label
    assert streamed[1].error is not None and streamed[1].error.code == grpc.StatusCode.INVALID_ARGUMENT
    assert truncated_texts(server) == counted + 2


def truncated_texts(server) -> float:
    text = urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics").read().decode()
    return metric_values(text).get('raee_truncated_texts_total{task="sst2"}', 0.0)


def test_policies_the_client_refuses_the_server_refuses_too(client, server):
    with pytest.raises(InputError, match="k 5000 is out of range"):
        client.classify(["good"], task="sst2", k=5000)
    with pytest.raises(InputError, match="cannot be sent to a server"):
        client.classify(["good"], task="sst2", policy="calibrated:best")
    stub = pb_grpc.RaeeStub(grpc.insecure_channel(f"127.0.0.1:{server.port}"))
    for fields, message in ((dict(k=5000), "k 5000 is out of range"), (dict(policy=9), "unknown policy 9")):
        with pytest.raises(grpc.RpcError) as info:
            stub.Classify(pb.ClassifyRequest(task="sst2", texts=["good"], **fields), timeout=10)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and message in info.value.details()


def test_calibrated_by_default_and_faithful_raee_on_request(client, server, stores):
    from raee.engine import Engine
    from raee.store import load_store
    engine = Engine(load_store(stores["current"]), stores["backbone"])
    texts = ["good film", "awful dull plot", "bright and clever"]
    for policy in ("calibrated", "raee", "raee:k=4", "full", "static:2"):
        served = client.classify(texts, task="sst2", policy=policy).results
        local = engine.classify(texts, policy=policy)
        assert [(r.label, r.exit_layer, r.off_domain) for r in served] == [
            (r.label, r.exit_layer, r.off_domain) for r in local], policy
    default = client.classify(texts, task="sst2").results
    assert [r.exit_layer for r in default] == [r.exit_layer for r in engine.classify(texts)]


@pytest.mark.slow
def test_queue_full_is_resource_exhausted_at_once(stores):
    server = start(stores, max_queue=3, max_texts=2, max_wait_ms=1500,
                   wait_for_new_clients=True)  # the first request waits for company
    try:
        stub = pb_grpc.RaeeStub(grpc.insecure_channel(f"127.0.0.1:{server.port}"))
        waiting = stub.Classify.future(pb.ClassifyRequest(task="sst2", texts=["good film", "dull plot"]), timeout=10)
        # admitted: waited for, as a fixed sleep may end first on a slow machine
        assert wait_until(lambda: server.batcher.backlog == 2, timeout=10), server.batcher.backlog
        with Client(f"127.0.0.1:{server.port}", retries=0) as c:
            started = time.perf_counter()
            assert code_of(lambda: c.classify(["a", "b"], task="sst2")) == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert time.perf_counter() - started < 0.5
            assert c.classify(["good"], task="sst2").results  # one more text still fits
        assert len(waiting.result().results) == 2
    finally:
        server.stop(1)


@pytest.mark.slow
def test_expired_work_is_dropped_before_compute(stores):
    server = start(stores, max_wait_ms=400, wait_for_new_clients=True)  # the first request waits 400 ms for company
    rows = []
    hooks = [layer.register_forward_hook(lambda _m, a, _o: rows.append(a[0].shape[0]))
             for layer in stores["backbone"].layers]
    try:
        stub = pb_grpc.RaeeStub(grpc.insecure_channel(f"127.0.0.1:{server.port}"))
        with pytest.raises(grpc.RpcError) as info:
            stub.Classify(pb.ClassifyRequest(task="sst2", texts=["good film"]), timeout=0.1)
        assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        time.sleep(0.6)
        assert rows == []  # the batch ran after the deadline and skipped the expired request
    finally:
        for h in hooks:
            h.remove()
        server.stop(1)


def test_reload_refuses_mismatched_or_corrupt_stores_and_keeps_serving(stores, client, admin, tmp_path):
    before = client.info().tasks[0].store_version
    with pytest.raises(RaeeClientError) as info:
        admin.reload("sst2", stores["other"])
    assert info.value.code == grpc.StatusCode.FAILED_PRECONDITION and "fingerprint" in info.value.message
    import shutil
    broken = Path(stores["root"]) / "broken"
    shutil.copytree(Path(stores["next"]), broken)
    version = next(p for p in broken.iterdir() if p.name.startswith("v"))
    (version / "keys.faiss").write_bytes((version / "keys.faiss").read_bytes()[:50])
    assert code_of(lambda: admin.reload("sst2", str(broken))) == grpc.StatusCode.FAILED_PRECONDITION
    assert code_of(lambda: admin.reload("imdb", stores["next"])) == grpc.StatusCode.NOT_FOUND
    assert client.info().tasks[0].store_version == before
    assert client.classify(["good film"], task="sst2").store_version == before


def test_a_loaded_server_exempts_its_objects_from_garbage_collection(stores):
    gc.unfreeze()  # what this test process froze before
    assert gc.get_freeze_count() == 0
    server = start(stores)
    try:
        assert gc.get_freeze_count() > 1000  # a full collection walks only what requests allocate (service/heap.py)
    finally:
        server.stop(1)


@pytest.mark.slow
def test_reload_under_concurrent_traffic_fails_no_request(stores, server):
    failures, versions, stop = [], [], threading.Event()  # versions: each answer's, in order (list.append is atomic)

    def traffic():
        with Client(f"127.0.0.1:{server.port}", timeout=10) as c:
            while not stop.is_set():
                try:
                    versions.append(c.classify(["good film", "dull plot"], task="sst2").store_version)
                except Exception as exc:  # noqa: BLE001
                    failures.append(exc)

    def answered_after(mark: int, version: str) -> bool:
        """Whether traffic got an answer from `version` since it had `mark` answers (polled up to 20 s: a fixed
        sleep between reloads could end before a loaded machine's traffic saw the new version)."""
        wait_until(lambda: version in versions[mark:] or failures)
        return version in versions[mark:]

    threads = [threading.Thread(target=traffic) for _ in range(4)]
    for t in threads:
        t.start()
    try:
        assert answered_after(0, load_store(stores["current"]).version)  # traffic flows before the first reload
        with Client(f"127.0.0.1:{server.admin_port}") as admin:
            seen = []
            for path in (stores["next"], stores["current"], stores["next"], stores["current"]):
                mark = len(versions)
                seen.append(admin.reload("sst2", path).store_version)
                assert answered_after(mark, seen[-1]), (seen, failures)
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert failures == []
    assert len(set(seen)) == 2 and set(seen) <= set(versions)


def test_stream_answers_in_order(client):
    requests = [Request((f"good film {i}",), "sst2", request_id=str(i)) for i in range(20)]
    requests[5] = Request(("dull",), "sst2", policy="full", request_id="5")
    results = list(client.stream(requests))
    assert [r.request_id for r in results] == [str(i) for i in range(20)]
    assert results[5].results[0].exit_layer == 3


def test_concurrent_requests_share_batches_and_metrics_say_so(server, stores):
    """Eight concurrent requests: the batcher puts more than one in a batch. The first batch is held in the backbone
    until all eight are queued, so that the rest must share one whatever the scheduling (unheld, calls spread over
    more than max_wait_ms by a slow machine would each run alone), and the counts are this test's own (before,
    it read INVALID_ARGUMENT and shared batches left by earlier tests of the module: alone it failed)."""
    def batch_counts() -> tuple[float, float]:
        text = urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics").read().decode()
        values = metric_values(text)
        return values.get("raee_batch_size_count", 0.0), values.get("raee_batch_size_sum", 0.0)

    with Client(f"127.0.0.1:{server.port}", retries=0) as c:  # an INVALID_ARGUMENT of this test's own
        assert code_of(lambda: c.classify([""], task="sst2")) == grpc.StatusCode.INVALID_ARGUMENT
    batches_before, rows_before = batch_counts()
    barrier, gate, entered = threading.Barrier(8, timeout=20), threading.Event(), threading.Event()

    def hold(_module, _args):
        entered.set()
        gate.wait(20)

    def one():
        with Client(f"127.0.0.1:{server.port}") as c:
            barrier.wait()
            c.classify(["good film"], task="sst2")

    hook = stores["backbone"].layers[0].register_forward_pre_hook(hold)
    threads = [threading.Thread(target=one) for _ in range(8)]
    try:
        for t in threads:
            t.start()
        assert wait_until(lambda: entered.is_set() and server.batcher.backlog == 8), server.batcher.backlog
    finally:
        gate.set()
        hook.remove()
        for t in threads:
            t.join()
    text = urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics").read().decode()
    for name in ("raee_requests_total", "raee_stage_seconds_bucket", "raee_exit_layer_bucket", "raee_batch_size",
                 "raee_queue_depth", "raee_full_depth_fallbacks_total", "raee_retrieval_texts_total"):
        assert name in text
    assert 'raee_requests_total{code="INVALID_ARGUMENT",method="Classify"}' in text
    batches, rows = (after - before for after, before in zip(batch_counts(), (batches_before, rows_before)))
    assert rows == 8 and rows > batches  # some batch carried more than one row


@pytest.mark.slow
def test_off_domain_fallbacks_are_in_the_response_and_the_metrics(stores, tmp_path):
    import dataclasses

    from raee.store import load_store, write_store
    store = load_store(stores["current"])
    gate = dataclasses.replace(store.calibrated_policy.gate, min_similarity=2.0)  # every query is farther than that
    manifest = dataclasses.replace(store.manifest, version="", created_at="", files={},
                                   calibrated_policy=dataclasses.replace(store.calibrated_policy, gate=gate))
    version = write_store(tmp_path / "far", manifest, store.records, store.index, store.texts, store.lines)
    server = RaeeServer(ServerConfig(stores=(str(version),), host="127.0.0.1", port=0, metrics_port=0),
                        backbone=stores["backbone"]).start()
    try:
        assert server.loaded.wait(60) and server.load_error is None
        with Client(f"127.0.0.1:{server.port}") as c:
            results = c.classify(["good film", "dull plot"], task="sst2").results
            assert [(r.off_domain, r.exit_layer) for r in results] == [("far", 3)] * 2
            assert all(r.off_domain == "" for r in c.classify(["good film"], task="sst2", policy="raee").results)
        text = urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics").read().decode()
        assert metric_values(text).get('raee_off_domain_fallbacks_total{reason="far",task="sst2"}') == 2.0
    finally:
        server.stop(1)


@pytest.mark.slow
def test_health_goes_serving_only_after_loading_and_back_on_stop(stores):
    gate = threading.Event()

    def slow_backbone():
        gate.wait(30)
        return stores["backbone"]

    config = ServerConfig(stores=(stores["current"],), host="127.0.0.1", port=0, metrics_port=-1, drain_s=0)
    server = RaeeServer(config, backbone=slow_backbone).start()
    channel = grpc.insecure_channel(f"127.0.0.1:{server.port}")
    health = health_pb2_grpc.HealthStub(channel)
    status = lambda: health.Check(health_pb2.HealthCheckRequest(service="raee.v1.Raee")).status  # noqa: E731
    assert status() == health_pb2.HealthCheckResponse.NOT_SERVING
    with Client(f"127.0.0.1:{server.port}", retries=0) as c:
        assert code_of(lambda: c.classify(["good"], task="sst2")) == grpc.StatusCode.UNAVAILABLE
        assert code_of(c.info) == grpc.StatusCode.UNAVAILABLE
    # retries: attempts at 0.1, 0.3, 0.7 ... s; with 6 the last came 6.3 s in, which loading and warming the store
    # after the gate can outlast on a loaded machine; 10 allow 100 s, and it answers as soon as it is ready
    with Client(f"127.0.0.1:{server.port}", retries=10, backoff=0.1) as c:
        threading.Timer(0.2, gate.set).start()
        assert c.classify(["good film"], task="sst2").results  # retried UNAVAILABLE until ready
    assert status() == health_pb2.HealthCheckResponse.SERVING
    server.stop(1)


def test_reflection_lists_the_services(server):
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
    stub = reflection_pb2_grpc.ServerReflectionStub(grpc.insecure_channel(f"127.0.0.1:{server.port}"))
    response = next(stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")])))
    names = {s.name for s in response.list_services_response.service}
    assert {"raee.v1.Raee", "grpc.health.v1.Health"} <= names


@pytest.mark.slow
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(texts=st.lists(st.text(max_size=300), max_size=12), task=st.sampled_from(["sst2", "", "x" * 300, "sst2\x00"]),
       policy=st.integers(min_value=0, max_value=2 ** 31 - 1), layer=st.integers(min_value=0, max_value=2 ** 32 - 1),
       k=st.integers(min_value=0, max_value=2 ** 32 - 1))
def test_fuzzed_requests_never_yield_internal(server, texts, task, policy, layer, k):
    stub = pb_grpc.RaeeStub(grpc.insecure_channel(f"127.0.0.1:{server.port}"))
    try:
        stub.Classify(pb.ClassifyRequest(task=task, texts=texts, policy=policy, static_layer=layer, k=k),
                      timeout=10)
    except grpc.RpcError as exc:
        unknown = task != "sst2" and exc.code() == grpc.StatusCode.NOT_FOUND  # a valid request for a task not served
        assert unknown or exc.code() in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED), \
            exc.details()
    assert stub.GetInfo(pb.GetInfoRequest(), timeout=5).tasks[0].name == "sst2"


def test_config_sources_layer_yaml_env_flags(tmp_path):
    path = tmp_path / "serve.yaml"
    path.write_text("stores: [a]\nmax_batch: 8\nmax_wait_ms: 3\nport: 6000\n")
    config = load_config(["--config", str(path), "--max-batch", "16"], environ={"RAEE_MAX_WAIT_MS": "7",
                                                                                  "RAEE_PORT": "7000"})
    assert (config.stores, config.max_batch, config.max_wait_ms, config.port) == (("a",), 16, 7.0, 7000)
    from raee.errors import InputError
    with pytest.raises(InputError, match="no exit store"):
        load_config([], environ={})
    with pytest.raises(InputError, match="max_texts 2000 is larger than max_queue 1024"):
        load_config(["--store", "a", "--max-texts", "2000"], environ={})
    with pytest.raises(InputError, match="admin: true would let any client reload"):
        load_config(["--store", "a", "--admin", "true"], environ={})
    with pytest.raises(InputError, match="unknown settings"):
        path.write_text("stores: [a]\nbatch: 3\n")
        load_config(["--config", str(path)], environ={})


@pytest.mark.slow
def test_sigterm_drains_in_flight_work_then_exits(stores, tmp_path):
    from service.launch import free_port
    port, metrics_port = free_port(), free_port()
    # max_wait 5 s (within the 8 s notice period): the four calls still wait for company when SIGTERM comes. With
    # 300 ms and a fixed 0.1 s sleep, a slow machine could send SIGTERM before they arrived (UNAVAILABLE, counted as
    # errors) or after they had been answered (nothing drained). The notice outlasts the wait by 3 s, so the late
    # call below comes within it (UNAVAILABLE), not once the listener closes (with a 5 s notice the two ended
    # together, and a late call could be CANCELLED by the closing listener)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "RAEE_MAX_WAIT_MS": "5000", "RAEE_WAIT_FOR_NEW_CLIENTS": "true"}
    process = subprocess.Popen([sys.executable, "-m", "service.server", "--store", stores["current"], "--host",
                                "127.0.0.1", "--port", str(port), "--metrics-port", str(metrics_port), "--grace-s",
                                "10", "--drain-s", "8"],
                               env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        with Client(f"127.0.0.1:{port}", timeout=20, retries=0) as c:
            c.wait_until_serving(60)
            results, errors = [], []

            def one():
                try:
                    results.append(c.classify(["good film"], task="sst2"))
                except Exception as exc:  # noqa: BLE001
                    errors.append(exc)

            in_flight = [threading.Thread(target=one) for _ in range(4)]
            for t in in_flight:
                t.start()
            metrics_page = f"http://127.0.0.1:{metrics_port}/metrics"
            assert wait_until(lambda: "raee_queue_depth 4.0" in  # all four wait in the batcher
                              urllib.request.urlopen(metrics_page, timeout=10).read().decode(), every=0.02)
            process.send_signal(signal.SIGTERM)
            for t in in_flight:
                t.join()
            assert errors == [] and len(results) == 4
            late = code_of(lambda: c.classify(["good film"], task="sst2"))
            assert late == grpc.StatusCode.UNAVAILABLE
        assert process.wait(timeout=15) == 0
    finally:
        if process.poll() is None:
            process.kill()
        output = process.stdout.read()
    assert "draining" in output and "stopped" in output


def test_admin_cli_info_classify_and_reload_every_address(server, stores, capsys):
    from service.admin import main as admin
    address, admin_address = f"127.0.0.1:{server.port}", f"127.0.0.1:{server.admin_port}"
    assert admin(["--address", address, "info"]) == 0 and '"name": "sst2"' in capsys.readouterr().out
    assert admin(["--address", address, "classify", "--task", "sst2", "good film"]) == 0
    assert "exit" in capsys.readouterr().out
    assert admin(["--address", address, "classify", "--task", "sst2", OVER_LONG]) == 1
    assert "INVALID_ARGUMENT" in capsys.readouterr().err
    assert admin(["--address", address, "classify", "--task", "sst2", "--truncate", "good film", OVER_LONG]) == 0
    out = capsys.readouterr().out.splitlines()
    assert "cut to fit" not in out[0] and "(cut to fit)" in out[1]
    assert admin(["--address", admin_address, "reload", "--every-address", "--task", "sst2", "--store",
                  stores["current"]]) == 0
    assert f"{admin_address} sst2:" in capsys.readouterr().out
    assert admin(["--address", admin_address, "reload", "--task", "sst2", "--store", stores["other"]]) == 1
    assert "FAILED_PRECONDITION" in capsys.readouterr().err
    assert admin(["--address", address, "reload", "--task", "sst2", "--store", stores["current"]]) == 1
    assert "PERMISSION_DENIED" in capsys.readouterr().err  # the public listener serves no reloads


@pytest.mark.slow
def test_tls(stores, tmp_path):
    import shutil
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed")
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=localhost",
                    "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True)
    server = start(stores, tls_cert=str(cert), tls_key=str(key))
    try:
        with Client(f"localhost:{server.port}", root_certificates=cert.read_bytes()) as secure:
            assert secure.classify(["good film"], task="sst2").results
        with Client(f"127.0.0.1:{server.port}", retries=0, timeout=3) as plain:
            assert code_of(plain.info) == grpc.StatusCode.UNAVAILABLE  # plaintext cannot talk to a TLS port
    finally:
        server.stop(1)


@pytest.mark.slow
@pytest.mark.parametrize("bad", ["other", "truncated"])
def test_bad_store_is_refused_at_start_and_health_stays_not_serving(stores, tmp_path, bad):
    path = stores["other"]
    if bad == "truncated":
        import shutil
        shutil.copytree(Path(stores["next"]), tmp_path / "t")
        version = next(p for p in (tmp_path / "t").iterdir() if p.name.startswith("v"))
        (version / "records.npz").write_bytes((version / "records.npz").read_bytes()[:100])
        path = str(tmp_path / "t")
    config = ServerConfig(stores=(stores["current"], path), host="127.0.0.1", port=0, metrics_port=-1, drain_s=0)
    server = RaeeServer(config, backbone=stores["backbone"]).start()
    try:
        server.loaded.wait(60)
        assert server.load_error is not None
        assert ("fingerprint" if bad == "other" else "records.npz") in str(server.load_error)
        health = health_pb2_grpc.HealthStub(grpc.insecure_channel(f"127.0.0.1:{server.port}"))
        assert health.Check(health_pb2.HealthCheckRequest()).status == health_pb2.HealthCheckResponse.NOT_SERVING
    finally:
        server.stop(0)


@pytest.mark.slow
def test_a_request_timing_out_does_not_fail_its_batch_mates(stores):
    server = start(stores, max_wait_ms=300, wait_for_new_clients=True)  # both requests wait in one forming batch
    try:
        outcome = {}

        def patient():
            with Client(f"127.0.0.1:{server.port}", timeout=10, retries=0) as c:
                outcome["result"] = c.classify(["good film"], task="sst2")

        thread = threading.Thread(target=patient)
        thread.start()
        stub = pb_grpc.RaeeStub(grpc.insecure_channel(f"127.0.0.1:{server.port}"))
        with pytest.raises(grpc.RpcError) as info:
            stub.Classify(pb.ClassifyRequest(task="sst2", texts=["dull plot"]), timeout=0.05)
        assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        thread.join()
        assert outcome["result"].results  # the patient request was answered, not failed with INTERNAL
    finally:
        server.stop(1)


def test_a_mask_token_inside_a_text_is_refused_up_front(client):
    with pytest.raises(RaeeClientError) as info:
        client.classify(["good [MASK] film"], task="sst2")
    assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT and "mask tokens" in info.value.message


@pytest.mark.slow
def test_several_tasks_share_one_backbone(stores, sst2_like, tmp_path):
    import dataclasses
    movie = dataclasses.replace(TASK, name="movie-reviews")  # a second task on the same checkpoint
    examples = read_examples(sst2_like, movie)[:80]
    build_store(tmp_path / "movie", movie, stores["backbone"], examples, key=KeySpec("prefix", 1), progress=False)
    config = ServerConfig(stores=(stores["current"], str(tmp_path / "movie")), host="127.0.0.1", port=0,
                          metrics_port=-1, drain_s=0)
    server = RaeeServer(config, backbone=stores["backbone"]).start()
    try:
        server.loaded.wait(60)
        assert server.load_error is None
        with Client(f"127.0.0.1:{server.port}") as c:
            info = c.info()
            assert {t.name for t in info.tasks} == {"sst2", "movie-reviews"}
            a = c.classify(["good film"], task="sst2")
            b = c.classify(["good film"], task="movie-reviews")
            assert a.store_version != b.store_version and a.results[0].num_layers == b.results[0].num_layers
        engines = server.registry.engines()
        assert len({id(e.backbone) for e in engines}) == 1  # one backbone in memory for both tasks
    finally:
        server.stop(1)
