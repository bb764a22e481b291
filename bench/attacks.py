"""The attacks of issue 11 against a real raee-serve, with what valid clients see while each runs.

Every check starts a fresh server and measures `VALID_CLIENTS` closed-loop clients sending one sentence each, first
with no attack (their unloaded latency), then while the attack runs in a process of its own; meanwhile a health
probe and a one-sentence Classify probe each call every 50 ms. It reports both phases, the ratio of the valid
clients' p99s, what the attackers got, the probes' latencies and the server's resident memory. Targets (issue 11):
with 200 idle streams open, health and a valid Classify answer in under 100 ms; under each flood, valid clients'
p99 within 3x of their unloaded p99; past the queue limit, RESOURCE_EXHAUSTED in under 50 ms; no INTERNAL
anywhere; no store version that was serving is ever lost. Run through bench/reliability.py (--checks attack-...).
"""

from __future__ import annotations

import hashlib
import json
import math
import multiprocessing
import os
import shutil
import signal
import threading
import time
from collections import Counter
from pathlib import Path

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc
from load import closed_loop, own_channel

from raee.store import resolve_version
from service.api import pb, pb_grpc
from service.client import pushback_s
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


class Probe:
    """One call every 50 ms on a connection of its own, latencies and answers recorded, until stopped: health
    Check (`Probe.health`) or a one-sentence Classify (`Probe.classify`), as a prober would send them. After a
    refusal that says when to come back, it waits that long if longer, as gRPC clients with a retry policy do."""

    def __init__(self, call) -> None:
        self.call = call
        self.latencies: list[float] = []
        self.answer_log: list[str] = []
        self.answers: Counter = Counter()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run)

    @classmethod
    def health(cls, address: str) -> "Probe":
        stub = health_pb2_grpc.HealthStub(own_channel(address))
        return cls(lambda: health_pb2.HealthCheckResponse.ServingStatus.Name(
            stub.Check(health_pb2.HealthCheckRequest(), timeout=5).status))

    @classmethod
    def classify(cls, address: str, texts: int = 1) -> "Probe":
        stub = pb_grpc.RaeeStub(own_channel(address))
        request = pb.ClassifyRequest(task="sst2", texts=[TEXTS[i % 4] for i in range(texts)])
        return cls(lambda: stub.Classify(request, timeout=5) and "OK")

    def summary_by_answer(self) -> dict:
        """Latencies per answer (OK, RESOURCE_EXHAUSTED, ...)."""
        return {answer: ms([s for s, a in zip(self.latencies, self.answer_log) if a == answer])
                for answer in self.answers}

    def _run(self) -> None:
        wait = 0.05
        while not self._stop.wait(wait):
            started, wait = time.perf_counter(), 0.05
            try:
                answer = self.call()
            except grpc.RpcError as exc:
                answer, wait = exc.code().name, max(wait, pushback_s(exc) or 0.0)  # as a refused client is told
            self.latencies.append(time.perf_counter() - started)
            self.answer_log.append(answer)
            self.answers[answer] += 1

    def __enter__(self) -> "Probe":
        self._thread.start()
        return self

    def __exit__(self, *_exc) -> None:
        self._stop.set()
        self._thread.join()

    def summary(self) -> dict:
        return {**ms(self.latencies), "answers": dict(self.answers)}


def under_attack(server: ServerProcess, attack: str, args: tuple, seconds: float, baseline_seconds: float,
                 refusal_texts: int = 0) -> dict:
    """Valid clients alone, then while ATTACKS[attack](*args) runs in a process of its own (its threads must not
    share the valid clients' interpreter lock, or the figures would measure the client); figures of both phases.
    refusal_texts: also probe with requests of that many texts, which a full queue refuses, and time the refusals."""
    closed_loop(server.address, lambda w, n: pb.ClassifyRequest(task="sst2", texts=[TEXTS[n % 4]]), 2, 2.0)  # warm
    unloaded: dict = {}
    valid_load(server.address, baseline_seconds, unloaded)
    rss_before = server.rss_mb()
    context = multiprocessing.get_context("spawn")
    stop, results = context.Event(), context.Queue()
    attacker = context.Process(target=run_attack, args=(attack, args, stop, results))
    attacker.start()
    time.sleep(3.0)  # the attacker process starts and the attack reaches full strength
    loaded: dict = {}
    rss_peak = [server.rss_mb()]
    refusals = Probe.classify(server.address, refusal_texts) if refusal_texts else None
    with Probe.health(server.address) as health, Probe.classify(server.address) as probe:
        if refusals:
            refusals.__enter__()
        runner = threading.Thread(target=valid_load, args=(server.address, seconds, loaded))
        runner.start()
        while runner.is_alive():
            runner.join(1.0)
            rss_peak.append(server.rss_mb())
        if refusals:
            refusals.__exit__()
    stop.set()
    attacked = results.get(timeout=300)
    attacker.join(30)
    ratio = (loaded["latency"]["p99_ms"] / unloaded["latency"]["p99_ms"]
             if loaded["latency"]["p99_ms"] and unloaded["latency"]["p99_ms"] else None)
    return {"valid_unloaded": unloaded, "valid_attacked": loaded, "p99_ratio": round(ratio, 2) if ratio else None,
            "health_probe": health.summary(), "classify_probe": probe.summary(), "attack": attacked,
            **({"refusal_probe": refusals.summary_by_answer()} if refusals else {}),
            "rss_mb_before": round(rss_before), "rss_mb_peak": round(max(rss_peak)),
            "server_alive": server.process.poll() is None}


def run_attack(name: str, args: tuple, stop, results) -> None:
    """The attacker process: run one attack until `stop` is set, put its figures on `results`.

    It runs at the lowest CPU priority: a real attacker has machines of its own, while here it shares the clients'
    CPUs with the valid clients and probes, and at equal priority its threads would take those CPUs from them, so
    the valid clients' latency would measure their own starvation rather than the server. It still gets every
    cycle the valid clients leave idle while they wait on the server, so the attack keeps its strength."""
    os.nice(19)
    results.put(ATTACKS[name](*args, stop=stop))


def flood_passed(result: dict) -> bool:
    """Valid clients all answered, p99 within FLOOD_RATIO of unloaded, no INTERNAL anywhere, server alive."""
    codes = {**result["valid_attacked"]["codes"], **result["attack"].get("codes", {})}
    return (set(result["valid_attacked"]["codes"]) == {"OK"} and result["p99_ratio"] is not None
            and result["p99_ratio"] <= FLOOD_RATIO and "INTERNAL" not in codes and result["server_alive"])


def attack_loop(address: str, request: pb.ClassifyRequest, clients: int, stop) -> dict:
    """`clients` attackers, each on its own connection, sending `request` back to back until stopped."""
    calls = closed_loop(address, lambda _worker, _n: request, clients, math.inf, stop, obey_pushback=False)
    by_code = {code: ms([s for c, s in calls if c == code]) for code in {c for c, _ in calls}}
    return {"codes": dict(Counter(c for c, _ in calls)), "latency_by_code": by_code}


# -- the attacks --------------------------------------------------------------------------------------------------
def idle_streams(address: str, streams: int, stop) -> dict:
    """Open `streams` ClassifyStream calls over 10 connections, send nothing on them until stopped."""
    quiet = threading.Event()

    def nothing():
        quiet.wait(3600)
        return
        yield

    stubs = [pb_grpc.RaeeStub(own_channel(address)) for _ in range(10)]
    calls = [stubs[i % 10].ClassifyStream(nothing()) for i in range(streams)]
    stop.wait()
    still_open = sum(1 for c in calls if not c.done())
    quiet.set()
    for c in calls:
        c.cancel()
    return {"streams_opened": streams, "still_open_at_end": still_open}


def check_idle_streams(store: str, seconds: float, streams: int = 200) -> dict:
    """Row 1: 200 ClassifyStream calls that send nothing, spread over 10 connections."""
    server = ServerProcess([store])
    server.wait_serving()
    try:
        result = under_attack(server, "idle-streams", (server.address, streams), seconds, seconds)
    finally:
        server.stop()
    passed = (result["health_probe"]["p99_ms"] < IDLE_STREAM_MS and result["classify_probe"]["p99_ms"] < IDLE_STREAM_MS
              and set(result["classify_probe"]["answers"]) == {"OK"} and flood_passed(result))
    return {"check": "attack 1: 200 idle streams", "passed": passed, **result}


def check_over_long_flood(store: str, seconds: float) -> dict:
    """Row 2: 8 clients sending 64 texts of 8000 bytes (past the backbone's tokens), back to back."""
    server = ServerProcess([store])
    server.wait_serving()
    long_text = "good film " * 800  # 8000 bytes, within max_text_bytes; some 1600 tokens, past 256
    request = pb.ClassifyRequest(task="sst2", texts=[long_text] * 64)
    try:
        result = under_attack(server, "flood", (server.address, request, 8), seconds, seconds)
    finally:
        server.stop()
    attack_codes = result["attack"]["codes"]
    return {"check": "attack 2: over-long text flood", "passed": flood_passed(result)
            and set(attack_codes) == {"INVALID_ARGUMENT"}, **result}


def burst(address: str, calls: int, delay: float, stop) -> dict:
    """`calls` one-text calls sent at once after `delay` seconds (when valid clients are measured)."""
    time.sleep(delay)
    result = burst_of(address, calls)
    stop.wait()
    return result


def check_queue_flood(store: str, seconds: float, calls: int = 3000) -> dict:
    """Row 3: 64 clients sending 32 texts each back to back; then, on a fresh server, a burst of 3000 calls at
    once. Valid clients are measured under each."""
    server = ServerProcess([store])
    server.wait_serving()
    request = pb.ClassifyRequest(task="sst2", texts=[TEXTS[i % 4] for i in range(32)])
    try:
        result = under_attack(server, "flood", (server.address, request, 64), seconds, seconds, refusal_texts=32)
    finally:
        server.stop()
    server = ServerProcess([store])
    server.wait_serving()
    try:
        during_burst = under_attack(server, "burst", (server.address, calls, 4.0), seconds, seconds)
    finally:
        server.stop()
    refused = result["refusal_probe"].get("RESOURCE_EXHAUSTED", {})
    burst_codes = during_burst["attack"]["codes"]
    passed = (flood_passed(result) and refused.get("p99_ms") is not None and refused["p99_ms"] < REFUSAL_MS
              and flood_passed(during_burst) and "RESOURCE_EXHAUSTED" in burst_codes)
    return {"check": "attack 3: 64 clients x 32 texts; a 3000-call burst", "passed": passed, **result,
            "burst": during_burst}


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


def reload_storm(admin_address: str, store: str, reloaders: int, stop) -> dict:
    """`reloaders` clients calling ReloadStore back to back until stopped."""
    codes: Counter = Counter()
    lock = threading.Lock()

    def one() -> None:
        stub = pb_grpc.RaeeStub(own_channel(admin_address))
        while not stop.is_set():
            try:
                stub.ReloadStore(pb.ReloadStoreRequest(task="sst2", store_path=store), timeout=60)
                code = "OK"
            except grpc.RpcError as exc:
                code = exc.code().name
            with lock:
                codes[code] += 1

    threads = [threading.Thread(target=one) for _ in range(reloaders)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return {"codes": dict(codes)}


def check_reload_storm(store: str, seconds: float, reloaders: int = 40) -> dict:
    """Row 4: ReloadStore on the public port (refused), paths outside the roots (refused), then 40 clients
    calling ReloadStore back to back on the admin listener."""
    server = ServerProcess([store], admin=True)
    server.wait_serving()
    public = pb_grpc.RaeeStub(own_channel(server.address))
    try:
        public.ReloadStore(pb.ReloadStoreRequest(task="sst2", store_path=store), timeout=10)
        public_code = "OK"
    except grpc.RpcError as exc:
        public_code = exc.code().name
    outside = probe_outside_roots(server)
    try:
        result = under_attack(server, "reload-storm", (server.admin_address, store, reloaders), seconds, seconds)
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
        counted = server.metrics().get('raee_requests_total{code="INVALID_ARGUMENT",method="Classify"}', 0.0)
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
              and [i for i in failed_ids if i] == expected_failed
              and set(error_codes) == {"INVALID_ARGUMENT", "NOT_FOUND"}  # NOT_FOUND: the unknown task's
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


ATTACKS = {"idle-streams": idle_streams, "flood": attack_loop, "burst": burst, "reload-storm": reload_storm}
