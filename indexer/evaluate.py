"""raee-eval: compare exit policies on labelled test files, one exit store per task.

Prints, per task, a Markdown table: score (accuracy, or Matthews correlation for mcc tasks), average exit layer,
share of layers saved, latency p50 at batch 1 and throughput at batch 32 (real truncated forwards on a sample).
`raee-earliest:auto` is raee-earliest:A with A chosen on the store's calibration items (leave-one-out), never on
the test file. With several --store/--test pairs and --suite, also prints one paper-style table with averages.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
from pathlib import Path

from indexer.cli import runtime_args
from raee import cache
from raee.data import read_examples
from raee.engine import Engine
from raee.errors import RaeeError
from raee.evaluation import (
    Evaluator,
    PolicyResult,
    choose_earliest_ratio,
    default_policies,
    markdown_table,
)
from raee.runtime import configure_threads

log = logging.getLogger("raee-eval")
AUTO = "raee-earliest:auto"


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="raee-eval", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--store", action="append", required=True, metavar="DIR",
                   help="exit store (repeat with --test for a suite)")
    p.add_argument("--test", action="append", required=True, metavar="FILE",
                   help="labelled test file for the store in the same position")
    p.add_argument("--policies", default=None,
                   help="comma-separated: full, static:L, oracle, raee, raee-no-tau, raee-k:K, raee-earliest:A, "
                        "raee-earliest:auto, adainfer, confidence[:RATE] (default: all of them)")
    p.add_argument("--suite", action="store_true", help="also print one table over all stores, with averages")
    p.add_argument("--depth-budget", type=float, default=0.7,
                   help="raee-earliest:auto picks the best calibration score within this share of layers (0.7)")
    p.add_argument("--timing-sample", type=int, default=200, metavar="N",
                   help="test texts timed per policy (200; 0 = no timing)")
    p.add_argument("--limit", type=int, default=None, metavar="N", help="score only the first N test items")
    p.add_argument("--json", default=None, metavar="OUT", help="write the figures as JSON")
    p.add_argument("--plot", default=None, metavar="OUT.png",
                   help="score against average exit layer (one file per task in a suite: OUT-<task>.png)")
    p.add_argument("--batch-size", type=int, default=64, help="batch size of the scoring pass (64)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--backbone", default=None, metavar="PATH",
                   help="the store's backbone checkpoint, where it has moved since the build (its weights must match)")
    runtime_args(p, store_precision=True)
    p.add_argument("--allow-precision-mismatch", action="store_true",
                   help="evaluate a store at another precision than it was built at (exits may differ)")
    p.add_argument("--no-progress", action="store_true")
    return p


def evaluate_task(store_dir: str, test_file: str, args: argparse.Namespace) -> dict:
    engine = Engine.load(store_dir, device=args.device, source=args.backbone, runtime=args.runtime,
                         precision=args.precision, allow_precision_mismatch=args.allow_precision_mismatch)
    examples = read_examples(test_file, engine.task, limit=args.limit)
    ratio, curve = choose_earliest_ratio(engine.store, args.depth_budget)
    log.info("%s: raee-earliest:auto uses A=%g (leave-one-out on %d calibration items)", engine.task.name, ratio,
             engine.store.records.num_items)
    names = args.policies.split(",") if args.policies else [*default_policies(engine.num_layers), AUTO]
    evaluator = Evaluator(engine, examples, args.batch_size, not args.no_progress)
    results = []
    for name in (n.strip() for n in names if n.strip()):
        real = f"raee-earliest:{ratio:g}" if name == AUTO else name
        result = evaluator.evaluate(real, args.timing_sample)
        results.append(dataclasses.replace(result, policy=name))
        log.info("%s %s: %.4f at exit %.2f", engine.task.name, name, result.score, result.avg_exit_layer)
    return {"task": engine.task.name, "num_layers": engine.num_layers, "n": len(examples),
            "store": str(engine.store.path), "key": str(engine.store.key), "store_policy": engine.policy.to_dict(),
            "chosen_earliest_ratio": ratio,
            "calibration_curve": [{"earliest_ratio": a, "score": s, "avg_layers_run": d} for a, s, d in curve],
            "policies": {r.policy: r.to_dict() for r in results}, "_results": results}


def suite_table(tasks: list[dict]) -> str:
    """Paper-style: policies as rows, each task's score, the average score and the average share of layers run."""
    names = list(tasks[0]["policies"])
    header = "| policy | " + " | ".join(t["task"] for t in tasks) + " | avg score | avg layers run |"
    lines = [header, "|---|" + "---|" * (len(tasks) + 2)]
    for name in names:
        rows = [t["policies"].get(name) for t in tasks]
        if any(r is None for r in rows):
            continue
        scores = [100 * r["score"] for r in rows]
        layers = [1 - r["layers_saved"] for r in rows]
        lines.append(f"| {name} | " + " | ".join(f"{s:.2f}" for s in scores) +
                     f" | {sum(scores) / len(scores):.2f} | {100 * sum(layers) / len(layers):.0f}% |")
    return "\n".join(lines)


def plot(task: dict, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results: list[PolicyResult] = task["_results"]
    by_name = {r.policy: r for r in results}
    fig, ax = plt.subplots(figsize=(10, 5))
    static = sorted((r for r in results if r.policy.startswith("static:") or r.policy == "full"),
                    key=lambda r: r.avg_exit_layer)
    if static:
        ax.plot([r.avg_exit_layer for r in static], [100 * r.score for r in static], "o-", color="#999999",
                label="static:L (full at L)")
    earliest = sorted((r for r in results if r.policy.startswith("raee-earliest:") and r.policy != AUTO),
                      key=lambda r: r.avg_exit_layer)
    if earliest:
        ax.plot([r.avg_exit_layer for r in earliest], [100 * r.score for r in earliest], "s-", color="#3182bd",
                label="raee-earliest:A (A = 0.3 ... 0.9)")
    markers = {"raee": ("*", "#08519c"), AUTO: ("D", "#e6550d"), "oracle": ("^", "#31a354"),
               "adainfer": ("v", "#756bb1"), "confidence": ("P", "#d6616b")}
    for name, (marker, colour) in markers.items():
        if name in by_name:
            r = by_name[name]
            ax.scatter(r.avg_exit_layer, 100 * r.score, marker=marker, s=120, color=colour, zorder=3, label=name)
    for r in results:
        if r.policy.startswith("raee-k:") or r.policy == "raee-no-tau":
            ax.scatter(r.avg_exit_layer, 100 * r.score, marker=".", s=60, color="#6baed6", zorder=2)
            ax.annotate(r.policy.removeprefix("raee-"), (r.avg_exit_layer, 100 * r.score), fontsize=7,
                        xytext=(3, 3), textcoords="offset points")
    metric = "Matthews correlation x100" if results and results[0].metric == "mcc" else "accuracy %"
    ax.set_xlabel("average exit layer")
    ax.set_ylabel(metric)
    ax.set_title(f"{task['task']}: {task['n']} test items, {task['num_layers']} layers, key {task['key']}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("faiss.loader").setLevel(logging.WARNING)
    if len(args.store) != len(args.test):
        print("raee-eval: error: give one --test per --store, in the same order", file=sys.stderr)
        return 2
    tasks = []
    try:
        cache.use(args.cache_dir)
        configure_threads(args.threads)
        for store_dir, test_file in zip(args.store, args.test):
            tasks.append(evaluate_task(store_dir, test_file, args))
    except RaeeError as exc:
        print(f"raee-eval: error: {exc}", file=sys.stderr)
        return 2
    for task in tasks:
        print(f"\n## {task['task']}: {task['n']} test items, {task['num_layers']} layers, key {task['key']}; "
              f"raee-earliest:auto = A {task['chosen_earliest_ratio']:g}\n")
        print(markdown_table(task["_results"]))
        if args.plot:
            path = args.plot if len(tasks) == 1 else str(Path(args.plot).with_name(
                f"{Path(args.plot).stem}-{task['task']}{Path(args.plot).suffix}"))
            plot(task, path)
            print(f"\nplot written to {path}")
    if args.suite:
        print("\n## All tasks\n")
        print(suite_table(tasks))
    if args.json:
        clean = [{k: v for k, v in t.items() if k != "_results"} for t in tasks]
        Path(args.json).write_text(json.dumps(clean[0] if len(clean) == 1 and not args.suite else
                                              {"tasks": clean, "suite": suite_table(clean)}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
