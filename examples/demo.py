"""Classify a few sentences with an exit store and show where each one left the backbone.

    python examples/demo.py --store stores/sst2 [SENTENCE ...]
"""

from __future__ import annotations

import argparse
import logging

from raee import Engine

SENTENCES = [
    "a gorgeous, witty, seductive movie.",
    "the plot is nothing but boilerplate clichés from start to finish.",
    "it's a charming and often affecting journey.",
    "an ugly, pointless, stupid movie.",
    "the performances are solid, but the script never comes alive.",
    "one of the most exhilarating films of the year.",
]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--store", default="stores/sst2", help="exit store directory (stores/sst2)")
    p.add_argument("sentences", nargs="*", help="sentences to classify (default: six examples)")
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    engine = Engine.load(args.store)
    texts = args.sentences or SENTENCES
    engine.classify(texts[:1])  # warm-up: first calls pay one-time allocation costs
    print(f"\ntask {engine.task.name}, store {engine.store.version}, key {engine.store.key}, "
          f"{engine.num_layers} layers\n")
    print(f"{'label':<9} {'exit':>4} {'ms':>6}  text")
    for text in texts:
        r = engine.classify([text])[0]
        print(f"{r.label:<9} {r.exit_layer:>2}/{r.num_layers} {r.times.total_ms:>6.1f}  {text}")
    full = engine.classify(texts, policy="full")
    raee = engine.classify(texts)
    print(f"\nbatch of {len(texts)}: raee {raee[0].times.total_ms:.1f} ms "
          f"(key {raee[0].times.key_ms:.1f}, search {raee[0].times.search_ms:.1f}, "
          f"backbone {raee[0].times.backbone_ms:.1f}); full depth {full[0].times.total_ms:.1f} ms")


if __name__ == "__main__":
    main()
