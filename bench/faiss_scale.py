"""FAISS at scale: a synthetic store of --n 384-d keys (default one million) with synthetic exit records.

For flat (exact), HNSW and IVF: build time, resident memory added, search latency per query at batch 1 and 64,
recall@k against exact search, and how often the RAEE exit decision made from approximate neighbours equals the
one made from exact neighbours. Keys are clustered (sentence embeddings cluster by topic); each cluster has its own
per-layer chance of being right, so neighbours share exit patterns as real items do.

    python bench/faiss_scale.py --n 1000000 --json bench/faiss_scale.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from raee.index import IndexSpec, build_index, search  # noqa: E402
from raee.raee_rule import RaeeConfig, raee_exit_layers  # noqa: E402


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 20


def synthetic(n: int, dim: int, clusters: int, layers: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(clusters, dim)).astype(np.float32)
    assignment = rng.integers(0, clusters, n)
    xb = np.empty((n, dim), dtype=np.float32)
    for start in range(0, n, 100_000):  # in chunks: bounded temporary memory
        part = assignment[start:start + 100_000]
        xb[start:start + len(part)] = centres[part] + 0.6 * rng.normal(size=(len(part), dim)).astype(np.float32)
    xb /= np.linalg.norm(xb, axis=1, keepdims=True)
    chance = rng.uniform(0.2, 0.9, size=(clusters, layers + 1)).astype(np.float32)
    correct = rng.random((n, layers + 1), dtype=np.float32) < chance[assignment]
    records = np.where(correct, rng.uniform(0.5, 1.0, (n, layers + 1)).astype(np.float32), 0).astype(np.float32)
    q = rng.integers(0, clusters, 1000)
    xq = centres[q] + 0.6 * rng.normal(size=(1000, dim)).astype(np.float32)
    return xb, records, (xq / np.linalg.norm(xq, axis=1, keepdims=True)).astype(np.float32)


def per_query_ms(index, xq: np.ndarray, batch: int, k: int) -> float:
    search(index, xq[:batch], k)
    runs = []
    for _ in range(3):
        started = time.perf_counter()
        for i in range(0, len(xq), batch):
            search(index, xq[i:i + batch], k)
        runs.append((time.perf_counter() - started) * 1e3 / len(xq))
    return statistics.median(runs)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=1_000_000)
    p.add_argument("--dim", type=int, default=384)
    p.add_argument("--clusters", type=int, default=2000)
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--k", type=int, default=12)
    p.add_argument("--queries", type=int, default=256, help="queries timed per batch size")
    p.add_argument("--types", default="flat,hnsw,ivf")
    p.add_argument("--ef-construction", type=int, default=40, help="HNSW build beam (40: build time on 2 cores)")
    p.add_argument("--json", default=None)
    args = p.parse_args()
    import faiss
    started = time.perf_counter()
    xb, records, xq = synthetic(args.n, args.dim, args.clusters, args.layers)
    print(f"synthetic store: {args.n} x {args.dim} keys, {args.layers + 1} layers of records "
          f"({time.perf_counter() - started:.0f} s); faiss {faiss.__version__}, {faiss.omp_get_max_threads()} threads")
    config = RaeeConfig(k=args.k)
    exact = None
    rows = []
    for kind in args.types.split(","):
        before = rss_mb()
        started = time.perf_counter()
        index = build_index(xb, IndexSpec(kind, ef_construction=args.ef_construction))
        build_s = time.perf_counter() - started
        memory = rss_mb() - before
        sims, ids = search(index, xq, args.k)
        if kind == "flat":
            exact = (sims, ids)
        recall = float(np.mean([len(set(a) & set(b)) / args.k for a, b in zip(ids, exact[1])])) if exact else None
        exits = raee_exit_layers(sims, ids, records, config)
        agree = float(np.mean(exits == raee_exit_layers(*exact, records, config))) if exact else None
        row = {"index": kind, "build_s": build_s, "memory_mb": memory,
               "ms_per_query_batch1": per_query_ms(index, xq[:args.queries], 1, args.k),
               "ms_per_query_batch64": per_query_ms(index, xq[:args.queries], 64, args.k),
               "recall_at_k": recall, "raee_exit_agreement": agree}
        rows.append(row)
        print(row, flush=True)
        del index
    print(f"\n| index | build s | memory MB | ms/query, batch 1 | ms/query, batch 64 | recall@{args.k} | "
          "RAEE exit agrees with exact |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['index']} | {r['build_s']:.1f} | {r['memory_mb']:.0f} | {r['ms_per_query_batch1']:.3f} | "
              f"{r['ms_per_query_batch64']:.3f} | {r['recall_at_k']:.3f} | {r['raee_exit_agreement']:.3f} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"n": args.n, "dim": args.dim, "k": args.k, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
