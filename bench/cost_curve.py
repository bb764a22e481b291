"""Cost curve of a 24-layer RoBERTa-large-shaped masked LM with RANDOM weights: timing only, no accuracy.

For batch 1 and 32: the latency of running to layer l for every l in 0..24 (prompt embedding, l layers, the MLM
head at the mask), beside the cost of a retrieval key (prefix:2 = the first two layers, which the pass reuses; or a
separate all-MiniLM-L6-v2 embedder) and of a FAISS search over a store of --store-items keys. From it, the speed-up
that the average exit layers measured on real tasks (--exit-fractions, share of layers run) would give.

Method: one pass per repeat with a timestamp after the embeddings and after every layer; running to layer l is
exactly the first l steps of that pass, so latency(l) = embeddings + layers 1..l + one head call (timed apart).
Medians over --repeats.

    python bench/cost_curve.py --json bench/cost_curve.json
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
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from raee.backbones import MaskedLMBackbone  # noqa: E402
from raee.backbones.loading import embedded_model_path  # noqa: E402
from raee.data import read_examples  # noqa: E402
from raee.index import IndexSpec, build_index, search  # noqa: E402
from raee.keys import Embedder  # noqa: E402
from raee.tasks import load_task  # noqa: E402


def roberta_large_shaped() -> MaskedLMBackbone:
    from transformers import AutoTokenizer, RobertaConfig, RobertaForMaskedLM
    torch.manual_seed(0)
    config = RobertaConfig(vocab_size=50265, hidden_size=1024, num_hidden_layers=24, num_attention_heads=16,
                           intermediate_size=4096, max_position_embeddings=514, pad_token_id=1, type_vocab_size=1)
    model = RobertaForMaskedLM(config).eval()
    # No RoBERTa tokenizer is on this machine; all-MiniLM's WordPiece ids (< 30522) index the 50265-row embedding.
    tokenizer = AutoTokenizer.from_pretrained(embedded_model_path(), local_files_only=True)
    return MaskedLMBackbone(model, tokenizer, source="random RoBERTa-large shape (timing only)", max_tokens=512)


def layer_times(backbone, texts, task, repeats: int) -> tuple[list[float], float]:
    """(median cumulative ms after embeddings and each layer, median ms of one head call)."""
    prompting = task.prompting(backbone.kind, backbone.mask_token)
    head = backbone.head(prompting.head)
    runs, heads = [], []
    for _ in range(repeats + 1):  # the first run warms up
        with torch.inference_mode():
            started = time.perf_counter()
            fwd = backbone.start(prompting.prompts(texts))
            marks = [time.perf_counter() - started]
            while fwd.layer < backbone.num_layers:
                fwd.advance()
                marks.append(time.perf_counter() - started)
            head_started = time.perf_counter()
            backbone.label_logits(fwd, torch.ones(len(texts), dtype=torch.bool), head)
            heads.append(time.perf_counter() - head_started)
        runs.append(marks)
    runs, heads = runs[1:], heads[1:]
    return [statistics.median(r[i] for r in runs) * 1e3 for i in range(len(runs[0]))], statistics.median(heads) * 1e3


def timed_ms(fn, repeats: int) -> float:
    fn()
    samples = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - started)
    return statistics.median(samples) * 1e3


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--texts", default=str(ROOT / "data" / "sst2" / "test.jsonl"))
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--store-items", type=int, default=8544, help="keys in the synthetic store searched (8544, SST-5)")
    p.add_argument("--exit-fractions", default="",
                   help="name=share,... of layers run measured on real tasks, e.g. raee=0.91,raee-earliest:auto=0.55")
    p.add_argument("--json", default=None)
    args = p.parse_args()
    torch.set_grad_enabled(False)
    task = load_task("sst2")
    texts = [e.text for e in read_examples(args.texts, task, limit=32)]
    backbone = roberta_large_shaped()
    embedder = Embedder()
    rng = np.random.default_rng(0)
    out = {"model": "RoBERTa-large shape, random weights (timing only)", "threads": torch.get_num_threads(),
           "cores": os.cpu_count(), "batches": {}}
    for size in (1, 32):
        batch = texts[:size]
        cumulative, head = layer_times(backbone, batch, task, args.repeats)
        to_layer = [c + head for c in cumulative]  # latency of running to layer l and reading the head there
        keys = {"prefix:2": rng.normal(size=(args.store_items, 1024)).astype(np.float32),
                "embedder": rng.normal(size=(args.store_items, 384)).astype(np.float32)}
        search_ms = {}
        for name, xb in keys.items():
            xb /= np.linalg.norm(xb, axis=1, keepdims=True)
            index = build_index(xb, IndexSpec("flat"))
            xq = xb[:size] + 0.01
            search_ms[name] = timed_ms(lambda: search(index, xq, 12), args.repeats)
        embed_ms = timed_ms(lambda: embedder.encode(batch, batch_size=size), args.repeats)
        out["batches"][size] = {"to_layer_ms": to_layer, "head_ms": head, "search_ms": search_ms,
                                "embedder_key_ms": embed_ms, "prefix2_key_ms": cumulative[2]}
    full = {s: b["to_layer_ms"][-1] for s, b in out["batches"].items()}
    print(f"\n{out['model']}; torch threads {out['threads']} on {out['cores']} cores\n")
    print("| layer l | ms to layer l, batch 1 | ms to layer l, batch 32 | share of full depth (batch 32) |")
    print("|---|---|---|---|")
    for layer in range(25):
        b1, b32 = out["batches"][1]["to_layer_ms"][layer], out["batches"][32]["to_layer_ms"][layer]
        print(f"| {layer} | {b1:.1f} | {b32:.1f} | {b32 / full[32]:.0%} |")
    print("\n| stage | batch 1 ms | batch 32 ms | share of full depth, batch 1 | batch 32 |")
    print("|---|---|---|---|---|")
    for label, get in (("FAISS flat search, k=12, prefix key (1024-d)", lambda b: b["search_ms"]["prefix:2"]),
                       ("FAISS flat search, k=12, embedder key (384-d)", lambda b: b["search_ms"]["embedder"]),
                       ("embedder key (all-MiniLM-L6-v2)", lambda b: b["embedder_key_ms"]),
                       ("prefix:2 key (layers 1-2, reused by the pass)", lambda b: b["prefix2_key_ms"]),
                       ("head at one layer (label-word rows only)", lambda b: b["head_ms"])):
        b1, b32 = get(out["batches"][1]), get(out["batches"][32])
        print(f"| {label} | {b1:.2f} | {b32:.2f} | {b1 / full[1]:.1%} | {b32 / full[32]:.1%} |")
    # RAEE with a prefix:2 key also reads the head at layers 0, 1 and 2 (rows may exit there) and searches.
    overhead = {s: b["search_ms"]["prefix:2"] + 3 * b["head_ms"] for s, b in out["batches"].items()}
    if args.exit_fractions:
        print("\n| policy (share of layers run, measured) | batch 1 speed-up | batch 32 speed-up |")
        print("|---|---|---|")
        out["speedups"] = {}
        for item in args.exit_fractions.split(","):
            name, share = item.split("=")
            layer = float(share) * 24
            speedups = []
            for s in (1, 32):
                lo = int(np.floor(layer))
                curve = out["batches"][s]["to_layer_ms"]
                ms = curve[lo] + (curve[min(lo + 1, 24)] - curve[lo]) * (layer - lo) + overhead[s]
                speedups.append(full[s] / ms)
            out["speedups"][name] = speedups
            print(f"| {name} ({float(share):.0%}) | {speedups[0]:.2f}x | {speedups[1]:.2f}x |")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
