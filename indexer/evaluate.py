"""raee-eval: compare exit policies on labelled test files, one exit store per task.

Prints, per task, a Markdown table: score (accuracy, or Matthews correlation for mcc tasks) on the whole file and on
the texts not in the store verbatim, average exit layer, share of layers run (the prefix key's layers counted for
retrieval policies), share sent to full depth by the off-domain gate, whether a calibrated policy's guarantee held
on the file (match-full: accuracy within epsilon of full depth's; best: layers run within its depth budget), latency
p50 at batch 1 and throughput at batch 32 (real truncated forwards on a sample).
`calibrated` is the store's own calibrated policy; `calibrated:OBJECTIVE` is what that objective calibrates on the
store's items (never on the test file). With several --store/--test pairs, --suite adds one paper-style table with
averages, and --cross-domain scores every store on every test file (stores of tasks with the same labels).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
from pathlib import Path
from typing import Any, TypedDict

from indexer.cli import quiet_progress, require_plotting, runtime_args
from raee import cache
from raee.build import BATCH_SIZE
from raee.data import read_examples
from raee.engine import Engine
from raee.errors import InputError, RaeeError
from raee.evaluation import Evaluator, PolicyResult, markdown_table
from raee.exit_policy import FORMS, ExitPolicy, parse_policy_list
from raee.runtime import configure_threads

log = logging.getLogger("raee-eval")
TIMED = ("full", "calibrated", "calibrated:best", "raee", "oracle", "adainfer", "confidence")
CROSS_POLICIES = ("full", "calibrated", "calibrated:best", "raee")
Cells = dict[str, dict[str, dict[str, Any]]]  # "STORE->QUERIES" -> policy -> PolicyResult.to_dict()


class TaskFigures(TypedDict):
    """One store on its test file, as printed and written to --json."""

    task: str
    num_layers: int
    n: int  # test items scored
    n_read: int  # test items read (the rest were too long for the backbone)
    n_truncated: int  # test items cut to fit (--truncate)
    n_unseen: int  # scored items not in the store verbatim
    test_file: str
    store: str
    key: str
    calibrated_policy: str
    calibration_settings: dict[str, Any] | None
    calibration_evidence: dict[str, Any] | None
    policies: dict[str, dict[str, Any]]  # policy -> PolicyResult.to_dict()


def default_policies(num_layers: int, prefix_key: bool = True) -> list[str]:
    """Every policy raee-eval compares by default: baselines, faithful RAEE and its ablations, the accuracy rule
    uncalibrated (with a prefix key, also reading the key's layers by votes), and the calibrated objectives."""
    votes = [f"accuracy:key_layers=votes,cost={c}" for c in (0, 0.1, 0.2, 0.4, 1)] if prefix_key else []
    return ["full", *(f"static:{layer}" for layer in range(1, num_layers)), "oracle",
            "calibrated", "calibrated:best", "raee", "raee:weights=unsquared", "raee:use_tau=false", "raee:k=4",
            "raee:k=32", *(f"raee:earliest_ratio={a}" for a in (0.8, 0.6, 0.4)),
            *(f"accuracy:cost={c}" for c in (0, 0.1, 0.2, 0.4)), "accuracy:cost=0.2,values=confidence", *votes,
            "adainfer", "confidence"]


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="raee-eval", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--store", action="append", required=True, metavar="DIR",
                   help="exit store (repeat with --test for a suite)")
    p.add_argument("--test", action="append", required=True, metavar="FILE",
                   help="labelled test file for the store in the same position")
    p.add_argument("--policies", default=None,
                   help="comma-separated policies, each one of " + ", ".join(FORMS) + "; a KEY=VALUE item "
                        "belongs to the policy before it, as in raee:k=4,tau=0.8,full (default: the full "
                        "comparison)")
    p.add_argument("--suite", action="store_true", help="also print one table over all stores, with averages")
    p.add_argument("--cross-domain", action="store_true",
                   help="also score every store on the test files of the other tasks with the same labels (" +
                        ", ".join(CROSS_POLICIES) + "); each policy must be among --policies")
    p.add_argument("--timing-sample", type=int, default=200, metavar="N",
                   help="test texts timed per policy (200; 0 = no timing)")
    p.add_argument("--timed", default=",".join(TIMED), metavar="LIST",
                   help=f"policies to time, as --policies ({','.join(TIMED)}); the others get '-'")
    p.add_argument("--text-column", default="text", help="the test files' text field or column (text)")
    p.add_argument("--label-column", default="label", help="the test files' label field or column (label)")
    p.add_argument("--limit", type=int, default=None, metavar="N", help="score only the first N test items")
    p.add_argument("--truncate", action="store_true",
                   help="cut test items longer than the backbone reads to fit (counted as n_truncated) instead of "
                        "skipping them")
    p.add_argument("--json", default=None, metavar="OUT", help="write the figures as JSON")
    p.add_argument("--plot", default=None, metavar="OUT.png",
                   help="score against layers run (one file per task in a suite: OUT-<task>.png)")
    p.add_argument("--batch-size", type=int, default=BATCH_SIZE, help=f"batch size of the scoring pass ({BATCH_SIZE})")
    p.add_argument("--device", default="cpu")
    p.add_argument("--backbone", default=None, metavar="PATH",
                   help="the store's backbone checkpoint, where it has moved since the build (its weights must match)")
    runtime_args(p, store_precision=True)
    p.add_argument("--allow-precision-mismatch", action="store_true",
                   help="evaluate a store at another precision than it was built at (exits may differ)")
    p.add_argument("--no-progress", action="store_true")
    return p


def policy_names(args: argparse.Namespace, engine: Engine) -> list[str]:
    """The policies to compare, in canonical form."""
    defaults = default_policies(engine.num_layers, engine.store.key.source == "prefix")
    return [str(p) for p in parse_policy_list(args.policies or ",".join(defaults))]


def evaluate_task(engine: Engine, test_file: str, names: list[str], args: argparse.Namespace,
                  timed: set[str]) -> tuple[TaskFigures, list[PolicyResult]]:
    examples = read_examples(test_file, engine.task, text_column=args.text_column, label_column=args.label_column,
                             limit=args.limit)
    evaluator = Evaluator(engine, examples, names, args.batch_size, not args.no_progress, args.truncate)
    results = []
    for name in names:
        result = evaluator.evaluate(name, args.timing_sample if name in timed else 0)
        results.append(result)
        log.info("%s %s: %.4f at %.2f layers run", engine.task.name, name, result.score, result.avg_layers_run)
    store = engine.store
    evidence = store.calibration_evidence
    return TaskFigures(task=engine.task.name, num_layers=engine.num_layers, n=len(evaluator.examples),
                       n_read=len(examples), n_truncated=evaluator.truncated,
                       n_unseen=int((~evaluator.view.seen).sum()), test_file=test_file,
                       store=str(store.path), key=str(store.key), calibrated_policy=engine.calibrated().name,
                       calibration_settings=(store.manifest.calibration_settings.to_dict()
                                             if store.manifest.calibration_settings else None),
                       calibration_evidence=evidence.to_dict() if evidence else None,
                       policies={r.policy: r.to_dict() for r in results}), results


def row_label(name: str, key: str) -> str:
    """Retrieval policies' rows name the store's key."""
    return f"{name} (key {key})" if ExitPolicy.parse(name).uses_neighbours else name


def suite_table(tasks: list[TaskFigures]) -> str:
    """Paper-style: policies as rows, each task's score (and unseen-only score where it differs), the averages and
    the average share of layers run."""
    names = list(tasks[0]["policies"])
    header = "| policy | " + " | ".join(t["task"] for t in tasks) + " | avg score | avg unseen only | avg layers run |"
    lines = [header, "|---|" + "---|" * (len(tasks) + 3)]
    for name in names:
        if any(name not in t["policies"] for t in tasks):
            continue
        rows = [t["policies"][name] for t in tasks]
        cells = []
        for r in rows:
            cell = f"{100 * r['score']:.2f}"
            if not math.isclose(r["score"], r["score_unseen"], abs_tol=5e-5) and not math.isnan(r["score_unseen"]):
                cell += f" ({100 * r['score_unseen']:.2f})"
            if r["guarantee"]:
                cell += " ✓" if r["guarantee"] == "held" else " ✗"
            cells.append(cell)
        scores = [100 * r["score"] for r in rows]
        unseen = [100 * r["score_unseen"] for r in rows if not math.isnan(r["score_unseen"])]
        layers = [1 - r["layers_saved"] for r in rows]
        lines.append(f"| {row_label(name, tasks[0]['key'])} | " + " | ".join(cells) +
                     f" | {sum(scores) / len(scores):.2f} | {sum(unseen) / max(len(unseen), 1):.2f} | "
                     f"{100 * sum(layers) / len(layers):.0f}% |")
    return "\n".join(lines)


def cross_domain(engines: list[Engine], test_files: list[str], tasks: list[TaskFigures],
                 args: argparse.Namespace) -> Cells:
    """Every store on every other test file of a task with the same labels (a store's own file is taken from its
    task table): per policy, the score and layers run. Keys: "STORE->QUERIES"."""
    cells: Cells = {}
    for i, engine in enumerate(engines):
        for j, owner in enumerate(engines):
            if owner.task.labels != engine.task.labels or len(_peers(engines, engine)) < 2:
                continue
            if i == j:
                cells[f"{engine.task.name}->{owner.task.name}"] = {name: tasks[i]["policies"][name]
                                                                  for name in CROSS_POLICIES}
                continue
            examples = read_examples(test_files[j], engine.task, text_column=args.text_column,
                                     label_column=args.label_column, limit=args.limit)
            evaluator = Evaluator(engine, examples, list(CROSS_POLICIES), args.batch_size, not args.no_progress,
                                  args.truncate)
            cells[f"{engine.task.name}->{owner.task.name}"] = {
                name: evaluator.evaluate(name, 0).to_dict() for name in CROSS_POLICIES}
            log.info("cross-domain %s -> %s done", engine.task.name, owner.task.name)
    return cells


def _peers(engines: list[Engine], engine: Engine) -> list[Engine]:
    return [e for e in engines if e.task.labels == engine.task.labels]


def cross_table(engines: list[Engine], cells: Cells) -> str:
    """Rows: store task; columns: query task; per policy the score minus full depth's on those queries."""
    names = [e.task.name for e in engines if len(_peers(engines, e)) >= 2]
    lines = []
    for policy in CROSS_POLICIES:
        lines += [f"\n**{policy}**: score on the column's test file minus full depth's (layers run; share sent to "
                  "full depth by the off-domain gate)\n" if policy != "full" else
                  "\n**full depth**: score on the column's test file\n",
                  "| store \\ queries | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
        for store in names:
            row = []
            for queries in names:
                entry = cells[f"{store}->{queries}"]
                r, full = entry[policy], entry["full"]
                row.append(f"{100 * r['score']:.2f}" if policy == "full" else
                           f"{100 * (r['score'] - full['score']):+.2f} ({1 - r['layers_saved']:.0%}; "
                           f"{r['off_domain']:.0%})")
            lines.append(f"| {store} | " + " | ".join(row) + " |")
    return "\n".join(lines)


def plot(task: TaskFigures, results: list[PolicyResult], path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    num_layers = task["num_layers"]
    share = {r.policy: 100 * r.avg_layers_run / num_layers for r in results}
    fig, ax = plt.subplots(figsize=(10, 5))

    def curve(kind: str, options: dict[str, str], style: str, colour: str, label: str) -> None:
        """One line through the policies of `kind` whose settings are exactly `options` ("*": any value)."""
        def on_line(name: str) -> bool:
            policy = ExitPolicy.parse(name)
            if kind == "static" and policy.kind == "full":
                return True
            given = dict(policy.options)
            return policy.kind == kind and set(given) == set(options) and all(
                v == "*" or str(given[k]) == v for k, v in options.items())
        rows = sorted((r for r in results if on_line(r.policy)), key=lambda r: share[r.policy])
        if rows:
            ax.plot([share[r.policy] for r in rows], [100 * r.score for r in rows], style, color=colour, label=label)

    curve("static", {}, "o-", "#999999", "static:L (full at 100%)")
    curve("raee", {"earliest_ratio": "*"}, "s-", "#6baed6", "raee:earliest_ratio=A")
    curve("accuracy", {"cost": "*"}, "^-", "#74c476", "accuracy:cost=C (uncalibrated)")
    curve("accuracy", {"cost": "*", "key_layers": "votes"}, "v--", "#238b45",
          "accuracy:cost=C,key_layers=votes (uncalibrated)")
    markers = {"raee": ("*", "#08519c"), "calibrated": ("D", "#e6550d"), "calibrated:best": ("P", "#a63603"),
               "oracle": ("^", "#31a354"), "adainfer": ("v", "#756bb1"), "confidence": ("X", "#d6616b")}
    for r in results:
        if r.policy in markers:
            marker, colour = markers[r.policy]
            ax.scatter(share[r.policy], 100 * r.score, marker=marker, s=120, color=colour, zorder=3, label=r.policy)
    metric = "Matthews correlation x100" if results and results[0].metric == "mcc" else "accuracy %"
    ax.set_xlabel("layers run, % (the prefix key's layers counted)")
    ax.set_ylabel(metric)
    ax.set_title(f"{task['task']}: {task['n']} test items, {num_layers} layers, key {task['key']}")
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
    tasks: list[TaskFigures] = []
    results: list[list[PolicyResult]] = []  # per task, in its policies' order
    cells: Cells | None = None
    quiet_progress(args)
    try:
        require_plotting(args.plot)  # before the long passes, not after them
        cache.use(args.cache_dir)
        configure_threads(args.threads)
        timed = {str(p) for p in parse_policy_list(args.timed)}
        engines = [Engine.load(store_dir, device=args.device, source=args.backbone, runtime=args.runtime,
                               precision=args.precision, allow_precision_mismatch=args.allow_precision_mismatch)
                   for store_dir in args.store]
        for engine, test_file in zip(engines, args.test):
            figures, task_results = evaluate_task(engine, test_file, policy_names(args, engine), args,
                                                  timed)
            tasks.append(figures)
            results.append(task_results)
        if args.cross_domain:
            missing = [p for p in CROSS_POLICIES if p not in tasks[0]["policies"]]
            if missing:
                raise InputError(f"--cross-domain needs {', '.join(missing)} among --policies")
            cells = cross_domain(engines, args.test, tasks, args)
    except RaeeError as exc:
        print(f"raee-eval: error: {exc}", file=sys.stderr)
        return 2
    for task, task_results in zip(tasks, results):
        skipped, cut = task["n_read"] - task["n"], task["n_truncated"]
        print(f"\n## {task['task']}: {task['n']} test items ({task['n_unseen']} not in the store verbatim"
              + (f"; {skipped} too long for the backbone, skipped" if skipped else "")
              + (f"; {cut} too long for the backbone, cut to fit" if cut else "") +
              f"), {task['num_layers']} layers, key {task['key']}; calibrated = {task['calibrated_policy']}\n")
        print(markdown_table(task_results))
        if args.plot:
            path = args.plot if len(tasks) == 1 else str(Path(args.plot).with_name(
                f"{Path(args.plot).stem}-{task['task']}{Path(args.plot).suffix}"))
            plot(task, task_results, path)
            print(f"\nplot written to {path}")
    if args.suite:
        print("\n## All tasks\n")
        print(suite_table(tasks))
    if cells is not None:
        print("\n## Cross-domain\n")
        print(cross_table(engines, cells))
    if args.json:
        Path(args.json).write_text(json.dumps(
            tasks[0] if len(tasks) == 1 and not args.suite and cells is None else
            {"tasks": tasks, "suite": suite_table(tasks), "cross_domain": cells}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
