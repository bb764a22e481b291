"""The demo: start raee-serve on an exit store in the background, wait until it is SERVING, classify sentences
through the Python client, print label, exit layer and latency, then stop the server with SIGTERM.

    python examples/demo.py --store stores/sst2 [SENTENCE ...]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

from service.client import Client
from service.launch import ServerProcess

SENTENCES = [
    "a gorgeous, witty, seductive movie.",
    "the plot is nothing but boilerplate clichés from start to finish.",
    "it's a charming and often affecting journey.",
    "an ugly, pointless, stupid movie.",
    "the performances are solid, but the script never comes alive.",
    "one of the most exhilarating films of the year.",
]
REPEATS = 7  # calls per policy for the whole-request timing


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--store", default="stores/sst2", help="exit store directory (stores/sst2)")
    p.add_argument("sentences", nargs="*", help="sentences to classify (default: six examples)")
    args = p.parse_args()
    server = ServerProcess([args.store])
    try:
        with Client(server.address, timeout=30) as client:
            started = time.perf_counter()
            if not server.wait_serving(180):
                print(f"raee-serve did not come up; its log:\n{server.output()[-3000:]}", file=sys.stderr)
                return 1
            info = client.info()
            task = info.tasks[0]
            print(f"\nraee-serve on {server.address} SERVING after {time.perf_counter() - started:.1f} s: task "
                  f"{task.name}, store {task.store_version}, backbone {info.backbone['source']} "
                  f"({info.backbone['num_layers']} layers, {info.backbone['runtime']} {info.backbone['precision']})"
                  "\n")
            print(f"{'label':<9} {'exit':>5} {'ms':>6}  text")
            for text in args.sentences or SENTENCES:
                result = client.classify([text], task=task.name)
                r = result.results[0]
                print(f"{r.label:<9} {r.exit_layer:>2}/{r.num_layers} {result.timings.total_ms:>6.1f}  {text}")
            texts = args.sentences or SENTENCES
            took: dict[str, list[float]] = {"calibrated": [], "full": []}
            for _ in range(REPEATS):  # alternating, so that machine noise hits both alike; the medians are printed
                served = client.classify(texts, task=task.name)  # the store's calibrated policy
                full = client.classify(texts, task=task.name, policy="full")
                took["calibrated"].append(served.timings.total_ms)
                took["full"].append(full.timings.total_ms)
            print(f"\nall {len(texts)} in one request, median of {REPEATS}: calibrated policy "
                  f"{statistics.median(took['calibrated']):.1f} ms (average layers run "
                  f"{sum(r.layers_run for r in served.results) / len(texts):.2f}), full depth "
                  f"{statistics.median(took['full']):.1f} ms")
    finally:
        print(f"server stopped (exit code {server.stop()}; log {server.log.name})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
