"""Scripted, repeatable reliability checks against a real raee-serve process.

  reload       reload under load: zero failed requests
  bad-stores   corrupt / truncated store and a store for another backbone: refused at start and at reload; the old
               version keeps serving
  sigterm      SIGTERM under load: in-flight requests complete, new ones are refused cleanly, exit within the grace
  overload     load past the queue limit: RESOURCE_EXHAUSTED within milliseconds, server memory bounded
  fuzz         random unicode, huge strings, empty lists, out-of-range numbers: never INTERNAL, server alive
  soak         moderate load: resident memory grows less than 10%
  attack-*     the attacks of issue 11 (bench/attacks.py): idle streams, over-long and queue floods, a reload
               storm, hostile stores, malformed bytes and bad stream requests, a second server, the SIGTERM notice

    python bench/reliability.py --store stores/sst2 --quick          # short runs of every check
    python bench/reliability.py --store stores/sst2 --soak-seconds 600 --json out/reliability.json
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import grpc
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from service.api import pb, pb_grpc  # noqa: E402
from service.client import Client, RaeeClientError  # noqa: E402
from service.launch import ServerProcess  # noqa: E402

sys.path.insert(0, str(ROOT / "bench"))
import attacks  # noqa: E402
from load import closed_loop  # noqa: E402

TEXTS = ["a gorgeous, witty, seductive movie.", "the plot is nothing but boilerplate clichés.",
         "it's a charming and often affecting journey.", "an ugly, pointless, stupid movie."]


def load(address: str, seconds: float, concurrency: int, task: str = "sst2") -> tuple[Counter, list[float]]:
    """Closed-loop traffic of single sentences; returns (status codes, latencies in seconds)."""
    calls = closed_loop(address, lambda worker, n: pb.ClassifyRequest(task=task, texts=[TEXTS[(worker + n) % 4]]),
                        concurrency, seconds)
    return Counter(code for code, _ in calls), [s for _, s in calls]


def broken_copies(store: str, workdir: Path) -> dict[str, str]:
    """A truncated, a bit-flipped and an other-backbone store beside the good one."""
    from raee.store import resolve_version
    out = {}
    for damage in ("truncated", "corrupted"):
        target = workdir / damage
        version = resolve_version(store)
        shutil.copytree(version, target / version.name)
        (target / "CURRENT").write_text(version.name + "\n")
        keys = target / version.name / ("keys.faiss" if damage == "truncated" else "records.npz")
        data = keys.read_bytes()
        keys.write_bytes(data[: len(data) // 2] if damage == "truncated" else data[:200] + bytes([data[200] ^ 0xFF])
                         + data[201:])
        out[damage] = str(target)
    out["other backbone"] = other_backbone_store(workdir / "other")
    return out


def other_backbone_store(directory: Path) -> str:
    """An sst2 store built on a tiny random BERT MLM: same task, other weights."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertForMaskedLM

    from raee.backbones import load_backbone
    from raee.backbones.loading import embedded_model_path
    from raee.build import build_store
    from raee.data import Example
    from raee.keys import KeySpec
    from raee.tasks import BUILTIN_TASKS
    torch.manual_seed(0)
    checkpoint = directory / "checkpoint"
    BertForMaskedLM(BertConfig(num_hidden_layers=2, hidden_size=32, num_attention_heads=2,
                               intermediate_size=64)).save_pretrained(checkpoint)
    AutoTokenizer.from_pretrained(embedded_model_path(), local_files_only=True).save_pretrained(checkpoint)
    examples = [Example(t, i % 2, i + 1) for i, t in enumerate(TEXTS * 5)]
    build_store(directory / "store", BUILTIN_TASKS["sst2"], load_backbone(str(checkpoint)), examples,
                key=KeySpec("prefix", 1), progress=False)
    return str(directory / "store")


def check_reload_under_load(store: str, seconds: float) -> dict:
    server = ServerProcess([store], admin=True)
    server.wait_serving()
    try:
        result: dict = {}
        traffic = threading.Thread(target=lambda: result.update(zip(("codes", "latencies"),
                                                                    load(server.address, seconds, 8))))
        traffic.start()
        reloads = 0
        with Client(server.admin_address) as admin:
            while traffic.is_alive():
                admin.reload("sst2", store)
                reloads += 1
                time.sleep(0.25)
        traffic.join()
        failed = sum(n for code, n in result["codes"].items() if code != "OK")
        return {"check": "reload under load", "passed": failed == 0 and reloads > 0, "reloads": reloads,
                "requests": sum(result["codes"].values()), "failed": failed}
    finally:
        server.stop()


def check_bad_stores(store: str, broken: dict[str, str]) -> dict:
    details = {}
    for name, path in broken.items():  # at start, beside the good store: never SERVING, exits non-zero, says why
        server = ServerProcess([store, path])
        code = server.process.wait(timeout=300)
        details[f"start with {name}"] = {"exit_code": code, "said": next((line for line in server.output().splitlines()
                                                                          if "cannot serve" in line), "")[-160:]}
    server = ServerProcess([store], admin=True, roots=(store, str(Path(next(iter(broken.values()))).parent)))
    server.wait_serving()
    try:
        with Client(server.address) as c, Client(server.admin_address) as admin:
            before = c.info().tasks[0].store_version
            for name, path in broken.items():
                try:
                    admin.reload("sst2", path)
                    details[f"reload with {name}"] = "accepted (WRONG)"
                except RaeeClientError as exc:
                    details[f"reload with {name}"] = exc.code.name
            still = c.classify(TEXTS[:1], task="sst2").store_version
    finally:
        server.stop()
    passed = (all(v["exit_code"] != 0 for k, v in details.items() if k.startswith("start"))
              and all(v == "FAILED_PRECONDITION" for k, v in details.items() if k.startswith("reload"))
              and still == before)
    return {"check": "bad stores refused at start and reload", "passed": passed, "old_version_serving": still == before,
            "details": details}


def check_sigterm(store: str, grace: float = 10.0) -> dict:
    server = ServerProcess([store], "--max-wait-ms", "200", grace=grace, drain=1.0)
    server.wait_serving()
    results, lock = Counter(), threading.Lock()

    def one() -> None:
        with Client(server.address, retries=0, timeout=30) as c:
            try:
                c.classify(TEXTS, task="sst2")
                code = "OK"
            except RaeeClientError as exc:
                code = exc.code.name
            with lock:
                results[code] += 1

    in_flight = [threading.Thread(target=one) for _ in range(8)]
    for t in in_flight:
        t.start()
    time.sleep(0.1)
    signalled = time.perf_counter()
    server.process.send_signal(signal.SIGTERM)
    for t in in_flight:
        t.join()
    late = Counter()
    with Client(server.address, retries=0, timeout=5) as c:
        try:
            c.classify(TEXTS[:1], task="sst2")
            late["OK"] += 1
        except RaeeClientError as exc:
            late[exc.code.name] += 1
    code = server.process.wait(timeout=grace + 30)
    took = time.perf_counter() - signalled
    passed = results == Counter({"OK": 8}) and "OK" not in late and code == 0 and took <= grace + 5
    return {"check": "SIGTERM under load", "passed": passed, "in_flight": dict(results), "after_sigterm": dict(late),
            "exit_code": code, "seconds_to_exit": round(took, 2)}


def check_overload(store: str, seconds: float) -> dict:
    """32 clients sending 4 texts each back to back at a queue of 16 texts (in a process of their own); a probe
    sending the same requests times the refusals."""
    server = ServerProcess([store], "--max-queue", "16", "--max-batch", "8", "--max-texts", "4")
    server.wait_serving()
    try:
        result = attacks.under_attack(server, "flood", (server.address, pb.ClassifyRequest(task="sst2", texts=TEXTS),
                                                        32), seconds, seconds, refusal_texts=4)
    finally:
        server.stop()
    refused = result["refusal_probe"].get("RESOURCE_EXHAUSTED", {})
    codes = {**result["attack"]["codes"], **result["valid_attacked"]["codes"]}
    passed = (refused.get("n", 0) > 0 and refused["p99_ms"] < attacks.REFUSAL_MS
              and set(codes) <= {"OK", "RESOURCE_EXHAUSTED"} and result["rss_mb_peak"] < result["rss_mb_before"] * 1.25)
    return {"check": "load past the queue limit", "passed": passed, "refused_p50_ms": refused.get("p50_ms"),
            "refused_p99_ms": refused.get("p99_ms"), **result}


def check_fuzz(store: str, requests: int) -> dict:
    server = ServerProcess([store])
    server.wait_serving()
    rng = random.Random(0)
    codes = Counter()
    try:
        stub = pb_grpc.RaeeStub(grpc.insecure_channel(server.address))

        def text() -> str:
            size = rng.choice([0, 1, 5, 50, 500, 5000, 200_000])
            return "".join(chr(rng.choice([rng.randint(32, 126), rng.randint(0x80, 0x10FFFF)])) for _ in range(size)
                           ).encode("utf-8", "replace").decode("utf-8", "replace")

        for _ in range(requests):
            request = pb.ClassifyRequest(task=rng.choice(["sst2", "", "SST2", "x" * 1000]),
                                         texts=[text() for _ in range(rng.choice([0, 1, 3, 100]))],
                                         policy=rng.choice([0, 1, 2, 3, 7, 2 ** 31 - 1]),
                                         static_layer=rng.choice([0, 3, 6, 7, 2 ** 32 - 1]),
                                         k=rng.choice([0, 1, 12, 1025, 2 ** 32 - 1]),
                                         return_neighbours=rng.random() < 0.5)
            try:
                stub.Classify(request, timeout=60)
                codes["OK"] += 1
            except grpc.RpcError as exc:
                codes[exc.code().name] += 1
        alive = bool(stub.GetInfo(pb.GetInfoRequest(), timeout=10).tasks)
    finally:
        server.stop()
    return {"check": "fuzzing", "passed": "INTERNAL" not in codes and alive and server.process.returncode == 0,
            "codes": dict(codes), "alive_after": alive}


def check_soak(store: str, seconds: float) -> dict:
    server = ServerProcess([store])
    server.wait_serving()
    try:
        load(server.address, min(30.0, seconds / 5), 4)  # warm-up: allocator pools, caches
        start = server.rss_mb()
        samples = [start]
        done = threading.Event()

        def sample() -> None:
            while not done.wait(5):
                samples.append(server.rss_mb())

        sampler = threading.Thread(target=sample)
        sampler.start()
        codes, latencies = load(server.address, seconds, 4)
        done.set()
        sampler.join()
        end = server.rss_mb()
        growth = end / start - 1
        return {"check": "soak", "passed": growth < 0.10 and set(codes) == {"OK"}, "seconds": seconds,
                "requests": sum(codes.values()), "codes": dict(codes), "rss_mb_start": round(start, 1),
                "rss_mb_end": round(end, 1), "rss_mb_max": round(max(samples), 1), "growth": round(growth, 4),
                "p50_ms": float(np.percentile(np.array(latencies) * 1e3, 50))}
    finally:
        server.stop()


CHECKS = ("reload", "bad-stores", "sigterm", "overload", "fuzz", "soak", "attack-idle-streams", "attack-over-long",
          "attack-queue-flood", "attack-reload-storm", "attack-hostile-stores", "attack-malformed",
          "attack-second-server", "attack-sigterm")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--store", default=str(ROOT / "stores" / "sst2"), help="a good sst2 store")
    p.add_argument("--quick", action="store_true", help="short runs of every check (about 2 minutes)")
    p.add_argument("--soak-seconds", type=float, default=600.0)
    p.add_argument("--checks", default=",".join(CHECKS))
    p.add_argument("--json", default=None)
    p.add_argument("--split-cpus", action="store_true",
                   help="run servers on the upper half of this machine's CPUs and every client and attacker on the "
                        "lower half, as if across a network: the figures then measure the server, not the CPU its "
                        "clients take from it")
    args = p.parse_args()
    if args.split_cpus:
        cpus = sorted(os.sched_getaffinity(0))
        if len(cpus) < 2:
            p.error("--split-cpus needs at least 2 CPUs")
        ServerProcess.cpus = set(cpus[len(cpus) // 2:])
        os.sched_setaffinity(0, set(cpus[:len(cpus) // 2]))
    seconds = 5.0 if args.quick else 30.0
    soak = 20.0 if args.quick else args.soak_seconds
    wanted = args.checks.split(",")
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        runs = {"reload": lambda: check_reload_under_load(args.store, seconds),
                "bad-stores": lambda: check_bad_stores(args.store, broken_copies(args.store, Path(tmp) / "broken")),
                "sigterm": lambda: check_sigterm(args.store),
                "overload": lambda: check_overload(args.store, seconds),
                "fuzz": lambda: check_fuzz(args.store, 60 if args.quick else 400),
                "soak": lambda: check_soak(args.store, soak),
                "attack-idle-streams": lambda: attacks.check_idle_streams(args.store, seconds),
                "attack-over-long": lambda: attacks.check_over_long_flood(args.store, seconds),
                "attack-queue-flood": lambda: attacks.check_queue_flood(args.store, seconds),
                "attack-reload-storm": lambda: attacks.check_reload_storm(args.store, seconds),
                "attack-hostile-stores": lambda: attacks.check_hostile_stores(args.store, Path(tmp) / "hostile"),
                "attack-malformed": lambda: attacks.check_malformed_and_streams(args.store,
                                                                                200 if args.quick else 1000),
                "attack-second-server": lambda: attacks.check_second_server(args.store),
                "attack-sigterm": lambda: attacks.check_sigterm_notice(args.store)}
        unknown = set(wanted) - set(runs)
        if unknown:
            p.error(f"unknown checks {sorted(unknown)}; valid: {', '.join(runs)}")
        for name in wanted:
            result = runs[name]()
            results.append(result)
            print(json.dumps(result), flush=True)
    print("\n| check | result |\n|---|---|")
    for r in results:
        print(f"| {r['check']} | {'PASS' if r['passed'] else 'FAIL'} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"quick": args.quick, "cores": os.cpu_count(),
                                               "server_cpus": sorted(ServerProcess.cpus or []), "results": results},
                                              indent=2))
    return 0 if all(r["passed"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
