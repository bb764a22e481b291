"""What a retrieval key costs on the embedded default: prefix:K (the backbone's own first K layers, which the serving
pass reuses) against a sentence-transformers embedder (a second model run before the backbone), beside the
backbone's full-depth pass. Prints a Markdown table and writes JSON beside it.

    python bench/key_cost.py --texts data/sst2/test.jsonl --n 256 --json bench/key_cost.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from raee.backbones import load_backbone, mean_pool
from raee.data import read_examples
from raee.keys import Embedder
from raee.tasks import load_task


def timed(fn, batches, repeats: int = 3) -> float:
    """Median over repeats of the mean milliseconds per batch."""
    fn(batches[0])  # warm-up
    runs = []
    for _ in range(repeats):
        start = time.perf_counter()
        for batch in batches:
            fn(batch)
        runs.append((time.perf_counter() - start) * 1e3 / len(batches))
    return statistics.median(runs)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--texts", default="data/sst2/test.jsonl")
    p.add_argument("--task", default="sst2")
    p.add_argument("--n", type=int, default=256, help="texts to time")
    p.add_argument("--batch-sizes", default="1,32")
    p.add_argument("--json", default=None)
    args = p.parse_args()
    torch.set_grad_enabled(False)
    task = load_task(args.task)
    texts = [e.text for e in read_examples(args.texts, task, limit=args.n)]
    backbone, embedder = load_backbone(), Embedder()
    prompting = task.prompting(backbone.kind, backbone.mask_token)

    def prefix(k):
        def run(batch):
            fwd = backbone.start(prompting.prompts(batch))
            while fwd.layer < k:
                fwd.advance()
            mean_pool(fwd.hidden, fwd.attention_mask)
        return run

    sources = {"prefix:1": prefix(1), "prefix:2": prefix(2), "prefix:3": prefix(3),
               "embedder (all-MiniLM-L6-v2)": lambda batch: embedder.encode(batch, batch_size=len(batch)),
               "backbone full depth (6 layers)": prefix(6)}
    rows = {}
    for size in [int(b) for b in args.batch_sizes.split(",")]:
        batches = [texts[i:i + size] for i in range(0, len(texts), size)]
        for name, fn in sources.items():
            rows.setdefault(name, {})[f"batch {size}"] = timed(fn, batches) / size
    print(f"ms per text, {len(texts)} texts from {args.texts}, torch threads {torch.get_num_threads()}\n")
    columns = list(next(iter(rows.values())))
    print("| key source | " + " | ".join(columns) + " |")
    print("|---|" + "---|" * len(columns))
    for name, row in rows.items():
        print(f"| {name} | " + " | ".join(f"{row[c]:.2f}" for c in columns) + " |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"ms_per_text": rows, "n": len(texts), "threads": torch.get_num_threads()}, f, indent=2)


if __name__ == "__main__":
    main()
