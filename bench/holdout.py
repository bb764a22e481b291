"""Does a store's leave-one-out calibration predict what held-out queries get? Train data only, no backbone pass.

From a store built on a whole train file: seeded splits of its items into A (--share) and B; the build's calibration
(raee.build.calibrate_items, leave-one-out) on A alone; B served against A's index exactly as raee-eval serves a
test file (the off-domain gate and its stream test included). Per seed: A's estimate (the chosen setting's
calibration accuracy minus full depth's, and its 1 - delta bound on the loss) against B's realized difference.
Over all seeds: the same for every setting on the match-full path (no selection), the nearest-neighbour similarity
of A's items leave-one-out against B's items searching A (near-duplicates in a train file would show here), and the
slope of B's realized difference on B's own full-depth accuracy. Prints Markdown tables and writes JSON.

    raee-index build --task sst5 --train DATA/sst5/train.jsonl --out stores/sst5
    python bench/holdout.py --store stores/sst5 --seeds 30 --json bench/holdout-sst5.json
"""

from __future__ import annotations

import argparse
import json

import numpy as np

from raee.accuracy_rule import AccuracyRuleConfig
from raee.build import calibrate_items, calibration_settings
from raee.calibration import SEARCH_WIDTH, accuracy_path, gate_maker, structure  # the match-full path
from raee.data import text_groups
from raee.evaluation import served_exits
from raee.exit_policy import ExitPolicy
from raee.exits import RecordArrays, Resolved, resolve
from raee.index import build_index, keys_of, leave_one_out_search, search
from raee.records import ExitRecords
from raee.store import ExitStore, load_store

QUANTILES = (0.01, 0.1, 0.5, 0.9, 0.99)
REPORTED_SETTINGS = (41, 51, 61, 71, 101, 151)  # 1-based places on the match-full path shown in the table


def split(n: int, share: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(A rows, B rows), each sorted: the first `share` of a seeded permutation, and the rest."""
    order = np.random.default_rng(seed).permutation(n)
    cut = int(round(share * n))
    return np.sort(order[:cut]), np.sort(order[cut:])


def subset(records: ExitRecords, rows: np.ndarray) -> ExitRecords:
    vocab = records.vocab_top2[rows] if records.vocab_top2 is not None else None
    return ExitRecords(records.gold[rows], records.label_logits[rows], vocab)


def served_right(resolved: Resolved, sims: np.ndarray, ids: np.ndarray, arrays: RecordArrays, key_layer: int,
                 queries: ExitRecords) -> tuple[np.ndarray, np.ndarray]:
    """(right (Q,), off-domain (Q,)) for queries served in order from their neighbours, as raee-eval serves a
    file (raee.evaluation.served_exits)."""
    exits, reasons = served_exits(resolved, sims, ids, arrays, key_layer, queries.predicted[:, :key_layer + 1])
    return queries.correct[np.arange(queries.num_items), exits], reasons != ""


def one_split(store: ExitStore, keys: np.ndarray, share: float, seed: int) -> dict:
    """Calibrate on A leave-one-out, serve B; the chosen setting and every setting on the path."""
    a, b = split(store.records.num_items, share, seed)
    records_a, records_b = subset(store.records, a), subset(store.records, b)
    index = build_index(keys[a], store.index_spec)
    texts_a = [store.texts[i] for i in a]
    settings = calibration_settings(store.manifest)  # delta as the build tested it
    policy, evidence = calibrate_items(records_a, index, texts_a, store.key, store.task.metric, store.policy,
                                       settings)
    arrays, num_layers = RecordArrays(records_a), store.num_layers
    full_a, full_b = records_a.correct[:, num_layers], records_b.correct[:, num_layers]
    sims_b, ids_b = search(index, keys[b], SEARCH_WIDTH)  # as wide as any setting reads
    right, off = served_right(resolve(ExitPolicy.parse("calibrated"), policy, store.policy, num_layers), sims_b,
                              ids_b, arrays, store.key_layer, records_b)
    chosen = evidence.curve[evidence.chosen] if evidence.chosen >= 0 else None
    sims_a, ids_a = leave_one_out_search(index, text_groups(texts_a), SEARCH_WIDTH)
    path = []
    for c in accuracy_path(records_a, sims_a, ids_a, structure(AccuracyRuleConfig(), settings),
                           store.key_layer,
                           gate_maker(records_a, sims_a, ids_a, settings)):
        right_c, _ = served_right(Resolved(rule=c.rule, gate=c.gate), sims_b, ids_b, arrays, store.key_layer,
                                  records_b)
        path.append((float(records_a.correct[np.arange(len(a)), c.exits].mean() - full_a.mean()),
                     float(right_c.mean() - full_b.mean())))
    return {"seed": seed, "policy": policy.name,
            "estimate": chosen.accuracy - evidence.full_accuracy if chosen else 0.0,
            "bound": chosen.risk_bound if chosen else 0.0,
            "realized": float(right.mean() - full_b.mean()), "full_b": float(full_b.mean()),
            "helps": int((right & ~full_b).sum()), "harms": int((~right & full_b).sum()),
            "off_domain": float(off.mean()),
            "path": path, "nearest_a": sims_a[:, 0].tolist(), "nearest_b": sims_b[:, 0].tolist()}


def report(runs: list[dict], epsilon: float) -> str:
    lines = ["| seed | A: estimate | A: bound | B: realized | B right/wrong vs full |",
             "|---|---|---|---|---|"]
    for r in runs:
        lines.append(f"| {r['seed']} | {100 * r['estimate']:+.2f} | {100 * r['bound']:.2f} | "
                     f"{100 * r['realized']:+.2f} | +{r['helps']} / -{r['harms']} |")
    estimate, realized = (100 * np.array([r[k] for r in runs]) for k in ("estimate", "realized"))
    gap = realized - estimate
    se = gap.std(ddof=1) / np.sqrt(len(gap)) if len(gap) > 1 else float("nan")
    lines += ["", f"mean estimate {estimate.mean():+.2f}, mean realized {realized.mean():+.2f}, gap {gap.mean():+.2f} "
              f"(SE {se:.2f}); B more than {100 * epsilon:g} point below full depth in "
              f"{int((realized < -100 * epsilon).sum())} of {len(runs)}"]
    path = 100 * np.array([r["path"] for r in runs])  # (S, settings, 2): leave-one-out on A, served on B
    lines += ["", "| path setting | A leave-one-out | B served | gap |", "|---|---|---|---|"]
    for i in (s for s in REPORTED_SETTINGS if s <= path.shape[1]):
        lines.append(f"| #{i} | {path[:, i - 1, 0].mean():+.2f} | {path[:, i - 1, 1].mean():+.2f} | "
                     f"{(path[:, i - 1, 1] - path[:, i - 1, 0]).mean():+.2f} |")
    near_a, near_b = (np.concatenate([r[k] for r in runs]) for k in ("nearest_a", "nearest_b"))
    lines += ["", "| nearest similarity quantile | " + " | ".join(f"{q:g}" for q in QUANTILES) + " |",
              "|---|" + "---|" * len(QUANTILES)]
    for name, near in (("A leave-one-out", near_a), ("B searching A", near_b)):
        lines.append(f"| {name} | " + " | ".join(f"{np.quantile(near, q):.3f}" for q in QUANTILES) + " |")
    if len(runs) > 2:
        full_b = 100 * np.array([r["full_b"] for r in runs])
        lines += ["", f"B realized against B's full-depth accuracy: slope {np.polyfit(full_b, realized, 1)[0]:+.2f}, "
                  f"correlation {np.corrcoef(full_b, realized)[0, 1]:+.2f}"]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--store", required=True, help="a store built from a whole train file")
    p.add_argument("--seeds", type=int, default=10, help="splits, seeded 0..N-1")
    p.add_argument("--share", type=float, default=0.7, help="share of the items in A")
    p.add_argument("--json", help="write every split's figures here")
    args = p.parse_args()
    store = load_store(args.store)
    keys = keys_of(store.index)
    runs = [one_split(store, keys, args.share, seed) for seed in range(args.seeds)]
    print(f"## {store.task.name}: {store.records.num_items} items, A {args.share:.0%}, {args.seeds} seeds\n")
    print(report(runs, store.calibrated_policy.settings.epsilon))
    if args.json:
        with open(args.json, "w") as f:
            json.dump([{k: v for k, v in r.items() if not k.startswith("nearest")} for r in runs], f, indent=1)


if __name__ == "__main__":
    main()
