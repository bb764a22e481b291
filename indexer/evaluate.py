"""raee-eval: score exit policies on a labelled test file with an exit store, through real truncated forwards."""

from __future__ import annotations

import argparse
import json
import logging
import sys

from raee.data import read_examples
from raee.engine import Engine
from raee.errors import RaeeError
from raee.evaluation import markdown_table, score_policies


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="raee-eval", description=__doc__)
    p.add_argument("--store", required=True, metavar="DIR", help="exit store built by raee-index build")
    p.add_argument("--test", required=True, metavar="FILE", help="labelled test data: JSONL, CSV or TSV")
    p.add_argument("--policies", default="raee,full", help="comma-separated: raee, full, static:L (raee,full)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--limit", type=int, default=None, metavar="N", help="score only the first N items")
    p.add_argument("--json", default=None, metavar="OUT", help="also write the figures as JSON")
    p.add_argument("--device", default="cpu")
    p.add_argument("--no-progress", action="store_true")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("faiss.loader").setLevel(logging.WARNING)
    try:
        engine = Engine.load(args.store, device=args.device)
        examples = read_examples(args.test, engine.task, limit=args.limit)
        policies = [p.strip() for p in args.policies.split(",") if p.strip()]
        scores = score_policies(engine, examples, policies, args.batch_size, not args.no_progress)
    except RaeeError as exc:
        print(f"raee-eval: error: {exc}", file=sys.stderr)
        return 2
    print(f"\n{engine.task.name}: {len(examples)} test items, {engine.num_layers} layers, "
          f"store {engine.store.version} (key {engine.store.key}, {engine.store.policy})\n")
    print(markdown_table(scores, engine.num_layers))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"task": engine.task.name, "num_layers": engine.num_layers, "n": len(examples),
                       "policies": {s.policy: s.to_dict() for s in scores}}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
