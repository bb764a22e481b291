"""The attacks of issue 11 against a real raee-serve, with what valid clients see while each runs.

Every check starts a fresh server, measures `VALID_CLIENTS` closed-loop clients sending one sentence each with no
attack (their unloaded latency), then again while the attack runs; it reports both, the ratio of the p99s, what the
attackers got, health-check latency and the server's resident memory. Targets (issue 11): with 200 idle streams
open, health and a valid Classify answer in under 100 ms; under each flood, valid clients' p99 within 3x of their
unloaded p99; past the queue limit, RESOURCE_EXHAUSTED in under 50 ms; no INTERNAL anywhere; no store version that
was serving is ever lost. Run through bench/reliability.py (--checks attack-...).
"""

from __future__ import annotations

import hashlib
import json
import shutil
import signal
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc

from load import closed_loop, own_channel
from raee.store import resolve_version
from service.api import pb, pb_grpc
from service.launch import ServerProcess

TEXTS = ["a gorgeous, witty, seductive movie.", "the plot is nothing but boilerplate clichés.",
         "it's a charming and often affecting journey.", "an ugly, pointless, stupid movie."]
VALID_CLIENTS = 4
FLOOD_RATIO = 3.0  # valid clients' p99 under a flood, at most this times their unloaded p99
IDLE_STREAM_MS = 100.0  # health and a valid Classify with the idle streams open
REFUSAL_MS = 50.0  # RESOURCE_EXHAUSTED past the queue limit


def ms(values: list[float]) -> dict:
    """p50, p99 and max of latencies given in seconds, in milliseconds."""
    if not values:
        return {"n": 0, "p50_ms": None, "p99_ms": None, "max_ms": None}
    a = np.array(values) * 1e3
    return {"n": len(a), "p50_ms": round(float(np.percentile(a, 50)), 1),
            "p99_ms": round(float(np.percentile(a, 99)), 1), "max_ms": round(float(a.max()), 1)}


def valid_load(address: str, seconds: float, out: dict) -> None:
    """VALID_CLIENTS clients, one sentence per request, closed loop; fills out['codes'] and out['latency']."""
    calls = closed_loop(address, lambda w, n: pb.ClassifyRequest(task="sst2", texts=[TEXTS[(w + n) % 4]]),
                        VALID_CLIENTS, seconds)
    out["codes"] = dict(Counter(code for code, _ in calls))
    out["latency"] = ms([s for code, s in calls if code == "OK"])


class HealthProbe:
    """grpc.health.v1 Check every 50 ms on its own connection, latencies and answers recorded, until stopped."""

    def __init__(self, address: str) -> None:
        self.stub = health_pb2_grpc.HealthStub(own_channel(address))
        self.latencies: list[float] = []
        self.answers: Counter = Counter()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run)

    def _run(self) -> None:
        while not self._stop.wait(0.05):
            started = time.perf_counter()
            try:
                status = self.stub.Check(health_pb2.HealthCheckRequest(), timeout=5).status
                self.answers[health_pb2.HealthCheckResponse.ServingStatus.Name(status)] += 1
            except grpc.RpcError as exc:
                self.answers[exc.code().name] += 1
            self.latencies.append(time.perf_counter() - started)

    def __enter__(self) -> "HealthProbe":
        self._thread.start()
        return self

    def __exit__(self, *_exc) -> None:
        self._stop.set()
        self._thread.join()

    def summary(self) -> dict:
        return {**ms(self.latencies), "answers": dict(self.answers)}


def under_attack(server: ServerProcess, attack, seconds: float, baseline_seconds: float) -> dict:
    """Valid clients alone, then with `attack(stop_event)` running in a thread; figures of both phases."""
    closed_loop(server.address, lambda w, n: pb.ClassifyRequest(task="sst2", texts=[TEXTS[n % 4]]), 2, 2.0)  # warm
    unloaded: dict = {}
    valid_load(server.address, baseline_seconds, unloaded)
    rss_before = server.rss_mb()
    stop, attacked = threading.Event(), {}
    attacker = threading.Thread(target=lambda: attacked.update(attack(stop) or {}))
    attacker.start()
    time.sleep(1.0)  # the attack reaches full strength
    loaded: dict = {}
    rss_peak = [server.rss_mb()]
    with HealthProbe(server.address) as health:
        runner = threading.Thread(target=valid_load, args=(server.address, seconds, loaded))
        runner.start()
        while runner.is_alive():
            runner.join(1.0)
            rss_peak.append(server.rss_mb())
    stop.set()
    attacker.join()
    ratio = (loaded["latency"]["p99_ms"] / unloaded["latency"]["p99_ms"]
             if loaded["latency"]["p99_ms"] and unloaded["latency"]["p99_ms"] else None)
    return {"valid_unloaded": unloaded, "valid_attacked": loaded, "p99_ratio": round(ratio, 2) if ratio else None,
            "health": health.summary(), "attack": attacked, "rss_mb_before": round(rss_before),
            "rss_mb_peak": round(max(rss_peak)), "server_alive": server.process.poll() is None}


def flood_passed(result: dict) -> bool:
    """Valid clients all answered, p99 within FLOOD_RATIO of unloaded, no INTERNAL anywhere, server alive."""
    codes = {**result["valid_attacked"]["codes"], **result["attack"].get("codes", {})}
    return (set(result["valid_attacked"]["codes"]) == {"OK"} and result["p99_ratio"] is not None
            and result["p99_ratio"] <= FLOOD_RATIO and "INTERNAL" not in codes and result["server_alive"])


def attack_loop(address: str, make_request, clients: int, stop: threading.Event) -> dict:
    """`clients` attackers, each on its own connection, sending make_request() back to back until stopped."""
    calls: list[tuple[str, float]] = []
    lock = threading.Lock()

    def one() -> None:
        stub = pb_grpc.RaeeStub(own_channel(address))
        mine = []
        while not stop.is_set():
            started = time.perf_counter()
            try:
                stub.Classify(make_request(), timeout=30)
                code = "OK"
            except grpc.RpcError as exc:
                code = exc.code().name
            mine.append((code, time.perf_counter() - started))
        with lock:
            calls.extend(mine)

    threads = [threading.Thread(target=one) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    by_code = {code: ms([s for c, s in calls if c == code]) for code in {c for c, _ in calls}}
    return {"codes": dict(Counter(c for c, _ in calls)), "latency_by_code": by_code}


# -- the attacks --------------------------------------------------------------------------------------------------
def check_idle_streams(store: str, seconds: float, streams: int = 200) -> dict:
    """Row 1: 200 ClassifyStream calls that send nothing, spread over 10 connections."""
    server = ServerProcess([store])
    server.wait_serving()
    quiet = threading.Event()

    def nothing():
        quiet.wait(600)
        return
        yield

    def attack(stop: threading.Event) -> dict:
        stubs = [pb_grpc.RaeeStub(own_channel(server.address)) for _ in range(10)]
        calls = [stubs[i % 10].ClassifyStream(nothing()) for i in range(streams)]
        stop.wait()
        alive = sum(1 for c in calls if c.running() or not c.done())
        for c in calls:
            c.cancel()
        return {"streams_open": streams, "streams_still_open_at_end": alive}

    try:
        result = under_attack(server, attack, seconds, seconds)
    finally:
        quiet.set()
        server.stop()
    passed = (result["health"]["p99_ms"] is not None and result["health"]["p99_ms"] < IDLE_STREAM_MS
              and result["valid_attacked"]["latency"]["p99_ms"] < IDLE_STREAM_MS
              and set(result["valid_attacked"]["codes"]) == {"OK"} and result["server_alive"])
    return {"check": "attack 1: 200 idle streams", "passed": passed, **result}


def check_over_long_flood(store: str, seconds: float) -> dict:
    """Row 2: 8 clients sending 64 texts of 8000 bytes (past the backbone's tokens), back to back."""
    server = ServerProcess([store])
    server.wait_serving()
    long_text = "good film " * 800  # 8000 bytes, within max_text_bytes; some 1600 tokens, past 256
    request = pb.ClassifyRequest(task="sst2", texts=[long_text] * 64)
    try:
        result = under_attack(server, lambda stop: attack_loop(server.address, lambda: request, 8, stop), seconds,
                              seconds)
    finally:
        server.stop()
    attack_codes = result["attack"]["codes"]
    return {"check": "attack 2: over-long text flood", "passed": flood_passed(result)
            and set(attack_codes) == {"INVALID_ARGUMENT"}, **result}


def check_queue_flood(store: str, seconds: float, burst: int = 3000) -> dict:
    """Row 3: 64 clients sending 32 texts each back to back, and a burst of 3000 calls in the middle."""
    server = ServerProcess([store])
    server.wait_serving()
    request = pb.ClassifyRequest(task="sst2", texts=[TEXTS[i % 4] for i in range(32)])

    def attack(stop: threading.Event) -> dict:
        flood: dict = {}
        flooding = threading.Thread(target=lambda: flood.update(attack_loop(server.address, lambda: request, 64,
                                                                            stop)))
        flooding.start()
        time.sleep(2.0)
        flood["burst"] = burst_of(server.address, burst)
        flooding.join()
        return flood

    try:
        result = under_attack(server, attack, seconds, seconds)
    finally:
        server.stop()
    refused = result["attack"]["latency_by_code"].get("RESOURCE_EXHAUSTED", {})
    burst_refused = result["attack"]["burst"]["latency_by_code"].get("RESOURCE_EXHAUSTED", {})
    passed = (flood_passed(result) and refused.get("p99_ms") is not None and refused["p99_ms"] < REFUSAL_MS
              and burst_refused.get("n", 0) > 0 and "INTERNAL" not in result["attack"]["burst"]["codes"])
    return {"check": "attack 3: 64 clients x 32 texts and a 3000-call burst", "passed": passed, **result}


def burst_of(address: str, calls: int) -> dict:
    """`calls` one-text calls sent at once over 8 connections; codes and latency by code."""
    stubs = [pb_grpc.RaeeStub(own_channel(address)) for _ in range(8)]
    done: list[tuple[str, float]] = []
    lock = threading.Lock()
    finished = threading.Semaphore(0)

    def on_done(future, started: float) -> None:
        code = future.code().name
        with lock:
            done.append((code, time.perf_counter() - started))
        finished.release()

    for i in range(calls):
        started = time.perf_counter()
        future = stubs[i % 8].Classify.future(pb.ClassifyRequest(task="sst2", texts=[TEXTS[i % 4]]), timeout=30)
        future.add_done_callback(lambda f, s=started: on_done(f, s))
    for _ in range(calls):
        finished.acquire(timeout=60)
    return {"codes": dict(Counter(c for c, _ in done)),
            "latency_by_code": {code: ms([s for c, s in done if c == code]) for code in {c for c, _ in done}}}


def check_reload_storm(store: str, seconds: float, reloaders: int = 40) -> dict:
    """Row 4: 40 clients calling ReloadStore back to back: first on the public port (refused), then with access."""
    server = ServerProcess([store], admin=True)
    server.wait_serving()
    public = pb_grpc.RaeeStub(own_channel(server.address))
    try:
        public.ReloadStore(pb.ReloadStoreRequest(task="sst2", store_path=store), timeout=10)
        public_code = "OK"
    except grpc.RpcError as exc:
        public_code = exc.code().name
    outside = probe_outside_roots(server)

    def attack(stop: threading.Event) -> dict:
        codes: Counter = Counter()
        lock = threading.Lock()

        def one() -> None:
            stub = pb_grpc.RaeeStub(own_channel(server.admin_address))
            while not stop.is_set():
                try:
                    stub.ReloadStore(pb.ReloadStoreRequest(task="sst2", store_path=store), timeout=60)
                    code = "OK"
                except grpc.RpcError as exc:
                    code = exc.code().name
                with lock:
                    codes[code] += 1

        with ThreadPoolExecutor(reloaders) as pool:
            for _ in range(reloaders):
                pool.submit(one)
        return {"codes": dict(codes)}

    try:
        result = under_attack(server, attack, seconds, seconds)
    finally:
        server.stop()
    passed = (public_code == "PERMISSION_DENIED" and outside == {"PERMISSION_DENIED"} and flood_passed(result)
              and set(result["attack"]["codes"]) <= {"OK", "ABORTED"})
    return {"check": "attack 4: reload storm", "passed": passed, "public_port_reload": public_code,
            "paths_outside_roots": sorted(outside), **result}


def probe_outside_roots(server: ServerProcess) -> set[str]:
    stub = pb_grpc.RaeeStub(own_channel(server.admin_address))
    codes = set()
    for path in ("/etc", "/no/such/store", "/proc/self"):
        try:
            stub.ReloadStore(pb.ReloadStoreRequest(task="sst2", store_path=path), timeout=10)
            codes.add("OK")
        except grpc.RpcError as exc:
            codes.add(exc.code().name)
    return codes


def hostile_copies(store: str, workdir: Path) -> dict[str, str]:
    """Copies of the store a careless operator or an attacker could leave (rows 5, 6, 13); each keeps its version
    name, so only what was done to it can make it fail."""
    source = resolve_version(store)
    out = {}

    def copy(name: str) -> Path:
        target = workdir / name
        shutil.copytree(source, target / source.name)
        (target / "CURRENT").write_text(source.name + "\n")
        return target / source.name

    def edit(version: Path, change) -> None:
        spec = json.loads((version / "manifest.json").read_text())
        change(spec)
        data = json.dumps(spec).encode()
        (version / "manifest.json").write_bytes(data)
        (version / "manifest.sha256").write_text(hashlib.sha256(data).hexdigest())

    for name, change in {"key prefix:9 on a 6-layer model": lambda m: m.update(key="prefix:9"),
                         "version naming a path outside": lambda m: m.update(version="../../../etc/passwd"),
                         "policy as a list": lambda m: m.update(policy=[1]),
                         "num_items missing": lambda m: m.pop("num_items")}.items():
        edit(copy(name), change)
    version = copy("manifest edited, checksum not")
    spec = json.loads((version / "manifest.json").read_text())
    spec["policy"]["k"] += 1
    (version / "manifest.json").write_text(json.dumps(spec, indent=2))
    version = copy("records.npz unreadable (a directory)")
    (version / "records.npz").unlink()
    (version / "records.npz").mkdir()
    version = copy("734 MB items file under its checksum")
    with (version / "items.jsonl").open("ab") as f:
        f.truncate(734 * 10**6)  # sparse
    edit(version, lambda m: m["files"]["items.jsonl"].update(bytes=734 * 10**6))
    for name in [p.name for p in workdir.iterdir()]:
        out[name] = str(workdir / name)
    return out


def check_hostile_stores(store: str, workdir: Path) -> dict:
    """Rows 5, 6, 13: reloads of hostile store copies are refused, fast, with memory flat, and the old version
    keeps serving."""
    copies = hostile_copies(store, workdir)
    server = ServerProcess([store], admin=True, roots=(store, str(workdir)))
    server.wait_serving()
    admin = pb_grpc.RaeeStub(own_channel(server.admin_address))
    stub = pb_grpc.RaeeStub(own_channel(server.address))
    try:
        before = stub.Classify(pb.ClassifyRequest(task="sst2", texts=[TEXTS[0]]), timeout=10).store_version
        rss_before, details = server.rss_mb(), {}
        for name, path in copies.items():
            started = time.perf_counter()
            try:
                admin.ReloadStore(pb.ReloadStoreRequest(task="sst2", store_path=path), timeout=60)
                code, said = "OK", ""
            except grpc.RpcError as exc:
                code, said = exc.code().name, exc.details()
            details[name] = {"code": code, "ms": round((time.perf_counter() - started) * 1e3, 1), "said": said[-160:]}
        after = stub.Classify(pb.ClassifyRequest(task="sst2", texts=[TEXTS[0]]), timeout=10).store_version
        rss_after = server.rss_mb()
    finally:
        server.stop()
    passed = (all(d["code"] == "FAILED_PRECONDITION" for d in details.values()) and after == before
              and rss_after < rss_before * 1.1)
    return {"check": "attacks 5, 6, 13: hostile stores at reload", "passed": passed, "old_version_serving":
            after == before, "rss_mb_before": round(rss_before), "rss_mb_after": round(rss_after), "details": details}


def check_malformed_and_streams(store: str, calls: int = 1000) -> dict:
    """Rows 9 and 14: bytes that are not a message, unary and inside a stream; a stream with bad requests."""
    server = ServerProcess([store], metrics=True)
    server.wait_serving()
    channel = own_channel(server.address)
    raw = channel.unary_unary("/raee.v1.Raee/Classify")
    codes: Counter = Counter()
    try:
        for i in range(calls):
            data = [b"\x12\x02\xff\xfe", b"\x0a\x05sst", b"\xff\xff\xff", bytes(range(256))][i % 4]
            try:
                raw(data, timeout=10)
                codes["OK"] += 1
            except grpc.RpcError as exc:
                codes[exc.code().name] += 1
        import urllib.request
        text = urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics").read().decode()
        counted = next((float(line.split()[-1]) for line in text.splitlines() if line.startswith(
            'raee_requests_total{code="INVALID_ARGUMENT",method="Classify"}')), 0.0)
        requests = []
        for i in range(100):
            bad = i % 10 == 3
            requests.append(pb.ClassifyRequest(task="sst2" if i % 20 != 13 else "imdb", texts=[""] if bad else
                                               [TEXTS[i % 4]], request_id=str(i)).SerializeToString())
        requests[57] = b"\xff\xff\xff"
        stream = channel.stream_stream("/raee.v1.Raee/ClassifyStream")
        answers = [pb.ClassifyResponse.FromString(r) for r in stream(iter(requests), timeout=120)]
        failed_ids = [a.request_id for a in answers if a.HasField("error")]
        error_codes = Counter(a.error.code_name for a in answers if a.HasField("error"))
        tracebacks = server.output().count("Traceback")
    finally:
        server.stop()
    expected_failed = sorted({str(i) for i in range(100) if i % 10 == 3 or i % 20 == 13} - {"57"}, key=int)
    passed = (codes == Counter({"INVALID_ARGUMENT": calls}) and counted == calls and len(answers) == 100
              and [i for i in failed_ids if i] == expected_failed and set(error_codes) == {"INVALID_ARGUMENT"}
              and tracebacks == 0)
    return {"check": "attacks 9, 14: malformed bytes; bad requests inside a stream", "passed": passed,
            "unary_codes": dict(codes), "counted_in_metrics": counted, "stream_responses": len(answers),
            "stream_errors": dict(error_codes), "stream_failed_request_ids": failed_ids,
            "tracebacks_in_log": tracebacks}


def check_second_server(store: str) -> dict:
    """Row 12: a second raee-serve on a port already taken exits at once with one line."""
    first = ServerProcess([store])
    first.wait_serving()
    try:
        second = ServerProcess([store], port=first.port)
        code = second.process.wait(timeout=120)
        said = [line for line in second.output().splitlines() if line.strip()]
        still = first.wait_serving(10)
    finally:
        first.stop()
    return {"check": "attack 12: a second server on a taken port", "passed": code == 2 and len(said) == 1 and still,
            "exit_code": code, "output": said, "first_still_serving": still}


def check_sigterm_notice(store: str, drain: float = 3.0) -> dict:
    """Row 15: after SIGTERM, health answers NOT_SERVING and calls UNAVAILABLE until the listener closes."""
    server = ServerProcess([store], drain=drain, grace=10.0)
    server.wait_serving()
    health = health_pb2_grpc.HealthStub(own_channel(server.address))
    stub = pb_grpc.RaeeStub(own_channel(server.address))
    seen: list[tuple[float, str]] = []
    signalled = time.perf_counter()
    server.process.send_signal(signal.SIGTERM)
    late = None
    while server.process.poll() is None and time.perf_counter() - signalled < 30:
        try:
            status = health.Check(health_pb2.HealthCheckRequest(), timeout=1).status
            seen.append((time.perf_counter() - signalled, health_pb2.HealthCheckResponse.ServingStatus.Name(status)))
        except grpc.RpcError as exc:
            seen.append((time.perf_counter() - signalled, exc.code().name))
        if late is None:
            try:
                stub.Classify(pb.ClassifyRequest(task="sst2", texts=[TEXTS[0]]), timeout=2)
                late = "OK"
            except grpc.RpcError as exc:
                late = exc.code().name
        time.sleep(0.1)
    code = server.process.wait(timeout=30)
    not_serving = [t for t, s in seen if s == "NOT_SERVING"]
    return {"check": "attack 15: SIGTERM notice", "passed": code == 0 and late == "UNAVAILABLE"
            and bool(not_serving) and max(not_serving) >= drain * 0.8,
            "exit_code": code, "late_call": late, "not_serving_for_s": round(max(not_serving, default=0), 2),
            "answers": dict(Counter(s for _, s in seen)), "seconds_to_exit": round(time.perf_counter() - signalled, 2)}

