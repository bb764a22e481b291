"""Closed-loop load over the real gRPC API: C concurrent clients for T seconds per policy, against one server.

Runs policy raee and full depth (per-request override) against the same server in one run, prints throughput,
p50/p95/p99 latency and errors by status code, and the raee/full throughput ratio. Writes JSON with --json.

    python bench/load.py --store stores/sst2 --concurrency 8 --seconds 20          # starts its own server
    python bench/load.py --address localhost:50051 --task sst2 --concurrency 8    # an existing server
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import grpc
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from service.api import pb, pb_grpc  # noqa: E402
from service.client import pushback_s  # noqa: E402
from service.launch import ServerProcess  # noqa: E402
from service.metrics import STAGES  # noqa: E402
from service.policy_wire import to_wire  # noqa: E402


def texts_from(path: str, n: int) -> list[str]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line)["text"] for line, _ in zip(f, range(n))]


def own_channel(address: str) -> grpc.Channel:
    """A channel with a connection of its own: channels in one process otherwise share one connection, and the
    server would see one client where a benchmark means several."""
    return grpc.insecure_channel(address, options=[("grpc.use_local_subchannel_pool", 1)])


def closed_loop(address: str, make_request, concurrency: int, seconds: float,
                stop: threading.Event | None = None, obey_pushback: bool = True) -> list[tuple[str, float]]:
    """C threads, each with its own channel and connection, send make_request(worker, n) back to back for
    `seconds` (or until `stop` is set, if given). Returns (status code name, seconds) for every call. A refused
    client waits as long as the refusal told it to (obey_pushback, as gRPC clients with a retry policy do); an
    attacker does not."""
    calls: list[tuple[str, float]] = []
    lock = threading.Lock()
    stop_at = time.perf_counter() + seconds

    def client(worker: int) -> None:
        stub = pb_grpc.RaeeStub(own_channel(address))
        mine, n = [], 0
        while time.perf_counter() < stop_at and not (stop is not None and stop.is_set()):
            request = make_request(worker, n)
            n += 1
            started, wait = time.perf_counter(), 0.0
            try:
                stub.Classify(request, timeout=30)
                code = "OK"
            except grpc.RpcError as exc:
                code, wait = exc.code().name, max(pushback_s(exc) or 0.0, 0.0) if obey_pushback else 0.0
            mine.append((code, time.perf_counter() - started))
            time.sleep(wait)
        with lock:
            calls.extend(mine)

    threads = [threading.Thread(target=client, args=(w,)) for w in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return calls


def run_policy(address: str, task: str, policy: str, texts: list[str], concurrency: int, seconds: float,
               batch: int, server: ServerProcess | None = None) -> dict:
    """Closed-loop load with one policy; throughput and latency percentiles of the successful calls, and, given the
    server (started with metrics), where its time went (`server_profile`)."""
    def make_request(worker: int, n: int) -> pb.ClassifyRequest:
        first = (worker + n * concurrency) * batch
        return pb.ClassifyRequest(task=task, texts=[texts[(first + j) % len(texts)] for j in range(batch)],
                                  **wire)

    wire = to_wire(policy)
    before = ServerSample.take(server) if server is not None else None
    started = time.perf_counter()
    calls = closed_loop(address, make_request, concurrency, seconds)
    elapsed = time.perf_counter() - started
    ms = np.array([s for code, s in calls if code == "OK"]) * 1e3
    result = {"policy": policy, "requests": len(ms), "texts_per_s": len(ms) * batch / elapsed,
              "requests_per_s": len(ms) / elapsed, "p50_ms": float(np.percentile(ms, 50)) if len(ms) else None,
              "p95_ms": float(np.percentile(ms, 95)) if len(ms) else None,
              "p99_ms": float(np.percentile(ms, 99)) if len(ms) else None,
              "codes": dict(Counter(code for code, _ in calls))}
    if server is not None and before is not None:
        result["server"] = server_profile(before, ServerSample.take(server), len(ms) * batch)
    return result


def print_server_profiles(profiles: dict[str, dict[str, float]]) -> None:
    """A Markdown table of server_profile results, one row per policy."""
    print("Where the server's time went (per batch: the engine's time, its stages, and the rest of a batch's cycle "
          "outside the engine; CPU per text answered):\n")
    print("| policy | texts/batch | batches/s | engine busy | engine ms | key ms | search ms | backbone ms | "
          "outside the engine ms | queue ms | server CPU ms/text | client CPU ms/text |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for policy, p in profiles.items():
        print(f"| {policy} | {p['texts_per_batch']:.1f} | {p['batches_per_s']:.1f} | {100 * p['engine_busy']:.0f}% | "
              f"{p['engine_ms_per_batch']:.1f} | {p['key_ms']:.1f} | {p['search_ms']:.1f} | {p['backbone_ms']:.1f} | "
              f"{p['outside_engine_ms_per_batch']:.1f} | {p['queue_ms']:.1f} | {p['server_cpu_ms_per_text']:.2f} | "
              f"{p['client_cpu_ms_per_text']:.2f} |")


class ServerSample:
    """A server's metrics and process CPU time, and this process's CPU time (the clients'), at one moment."""

    def __init__(self, metrics: dict[str, float], server_cpu_s: float, client_cpu_s: float) -> None:
        self.metrics, self.server_cpu_s, self.client_cpu_s = metrics, server_cpu_s, client_cpu_s
        self.at = time.perf_counter()

    @classmethod
    def take(cls, server: ServerProcess) -> "ServerSample":
        return cls(server.metrics(), server.cpu_seconds(), time.process_time())


def server_profile(before: ServerSample, after: ServerSample, texts: int) -> dict[str, float]:
    """Where a server's time went between two samples: batches, how busy the engine was (raee_batch_seconds), the
    stages (raee_stage_seconds: a request observes its batch's key, search and backbone times, so these means are
    per batch, weighted by requests; queue is the request's own wait), and CPU per text of the server and of the
    clients (this process)."""
    seconds = after.at - before.at

    def delta(name: str) -> float:
        return after.metrics.get(name, 0.0) - before.metrics.get(name, 0.0)

    batches = delta("raee_batch_size_count")
    requests = delta("raee_stage_seconds_count{stage=\"queue\"}")
    profile = {"batches_per_s": batches / seconds, "texts_per_batch": delta("raee_batch_size_sum") / max(batches, 1),
               "engine_busy": delta("raee_batch_seconds_sum") / seconds,
               "engine_ms_per_batch": 1e3 * delta("raee_batch_seconds_sum") / max(batches, 1),
               "outside_engine_ms_per_batch": 1e3 * (seconds - delta("raee_batch_seconds_sum")) / max(batches, 1),
               "server_cpu_cores": (after.server_cpu_s - before.server_cpu_s) / seconds,
               "client_cpu_cores": (after.client_cpu_s - before.client_cpu_s) / seconds,
               "server_cpu_ms_per_text": 1e3 * (after.server_cpu_s - before.server_cpu_s) / max(texts, 1),
               "client_cpu_ms_per_text": 1e3 * (after.client_cpu_s - before.client_cpu_s) / max(texts, 1)}
    for stage in STAGES:
        profile[f"{stage}_ms"] = 1e3 * delta(f"raee_stage_seconds_sum{{stage=\"{stage}\"}}") / max(requests, 1)
    return profile


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--store", help="start a server on this store (else --address)")
    p.add_argument("--address", help="host:port of a running server")
    p.add_argument("--task", default=None, help="task (default: the store's)")
    p.add_argument("--texts", default=str(ROOT / "data" / "sst2" / "test.jsonl"), help="JSONL of texts to send")
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--seconds", type=float, default=20.0, help="per policy")
    p.add_argument("--batch", type=int, default=1, help="texts per request (1)")
    p.add_argument("--policies", default="calibrated,raee,full",
                   help="policies, comma-separated: calibrated (the store's default), raee, full, static:L")
    p.add_argument("--server-args", default="", help="extra raee-serve flags when --store starts one")
    p.add_argument("--json", default=None)
    args = p.parse_args()
    server = None
    if args.store:
        server = ServerProcess([args.store], *args.server_args.split(), metrics=True)
        if not server.wait_serving():
            p.error(f"the server did not come up; its log:\n{server.output()[-2000:]}")
        address = server.address
    elif args.address:
        address = args.address
    else:
        p.error("give --store or --address")
    try:
        task = args.task
        if task is None:
            stub = pb_grpc.RaeeStub(grpc.insecure_channel(address))
            task = stub.GetInfo(pb.GetInfoRequest(), timeout=10).tasks[0].name
        texts = texts_from(args.texts, 2000)
        run_policy(address, task, "calibrated", texts, args.concurrency, 2.0, args.batch)  # warm-up
        results = [run_policy(address, task, policy, texts, args.concurrency, args.seconds, args.batch, server)
                   for policy in args.policies.split(",")]
    finally:
        if server is not None:
            server.stop()
    print(f"\n{task} at {address}: {args.concurrency} concurrent clients, {args.batch} text(s) per request, "
          f"{args.seconds:.0f} s per policy; {platform.processor() or platform.machine()}, {os.cpu_count()} cores\n")
    print("| policy | requests | texts/s | p50 ms | p95 ms | p99 ms | p99/p50 | status codes |")
    print("|---|---|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['policy']} | {r['requests']} | {r['texts_per_s']:.1f} | {r['p50_ms']:.1f} | {r['p95_ms']:.1f} | "
              f"{r['p99_ms']:.1f} | {r['p99_ms'] / r['p50_ms']:.2f} | {r['codes']} |")
    if server is not None:
        print()
        print_server_profiles({r["policy"]: r["server"] for r in results})
    by = {r["policy"]: r for r in results}
    for policy in ("calibrated", "raee"):
        if policy in by and "full" in by:
            print(f"\n{policy} / full throughput: {by[policy]['texts_per_s'] / by['full']['texts_per_s']:.2f}x")
    if args.json:
        Path(args.json).write_text(json.dumps({"task": task, "concurrency": args.concurrency, "batch": args.batch,
                                               "seconds": args.seconds, "cores": os.cpu_count(), "results": results},
                                              indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
