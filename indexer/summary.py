"""Human-readable summaries of exit records: per-layer accuracy and where items first become right."""

from __future__ import annotations

import numpy as np

from raee.calibration import CalibrationEvidence
from raee.guarantee import file_risk_bound
from raee.records import ExitRecords
from raee.store import ExitStore

BAR_WIDTH = 40


def layer_table(records: ExitRecords) -> str:
    """Markdown-ish table: per layer, accuracy and the share of items whose earliest correct layer it is."""
    accuracy = records.layer_accuracy()
    earliest = records.earliest_correct()
    counts = np.bincount(earliest[earliest >= 0], minlength=records.num_layers + 1)
    never = int((earliest < 0).sum())
    peak = max(int(counts.max()), never, 1)
    lines = ["layer  accuracy  earliest-correct items", "-----  --------  ----------------------"]
    for layer in range(records.num_layers + 1):
        bar = "#" * int(round(BAR_WIDTH * counts[layer] / peak))
        lines.append(f"{layer:>5}  {accuracy[layer]:8.3f}  {counts[layer]:>6} {bar}")
    lines.append(f"never            {never:>6} {'#' * int(round(BAR_WIDTH * never / peak))}")
    oracle = np.where(earliest >= 0, 1.0, 0.0).mean()
    lines.append(f"\n{records.num_items} items; full depth {accuracy[-1]:.3f}; right at some layer (oracle) "
                 f"{oracle:.3f}")
    return "\n".join(lines)


def plot_layers(records: ExitRecords, path: str, title: str) -> None:
    """PNG: per-layer accuracy (line) over the histogram of earliest-correct layers (bars)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    earliest = records.earliest_correct()
    layers = np.arange(records.num_layers + 1)
    counts = np.bincount(earliest[earliest >= 0], minlength=records.num_layers + 1)
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.bar(layers, counts / records.num_items, color="#9ecae1", label="share first right at this layer")
    ax.plot(layers, records.layer_accuracy(), "o-", color="#08519c", label="accuracy of this layer")
    ax.set_xlabel("layer (0 = embeddings)")
    ax.set_ylim(0, 1)
    ax.set_xticks(layers)
    ax.set_title(title)
    ax.legend(loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def tested_level(evidence: CalibrationEvidence, delta: float) -> float:
    """The level each setting was tested at: delta, or delta over the keys a build chose between (--key auto)."""
    return evidence.keys[0].delta if evidence.keys else delta


def calibration_summary(store: ExitStore, evidence: CalibrationEvidence) -> str:
    """A few lines: the calibrated policy, its gate, and what the calibration items (`evidence`, the store's
    calibration_evidence) said about it."""
    policy = store.calibrated_policy
    s = policy.settings
    goal = {"match-full": f"accuracy at most {100 * s.epsilon:g} point(s) below full depth's with probability "
                          f"{1 - s.delta:g}" + (f", also as measured on a file of {s.query_items} queries"
                                                 if s.query_items else ", in expectation"),
            "best": f"the best calibration score among settings certified to run at most {s.depth_budget:.0%} of "
                    f"the layers with probability {1 - s.delta:g}",
            "raee": "faithful RAEE"}[s.objective]
    lines = [f"\ncalibrated policy (objective {s.objective}: {goal}; {evidence.num_items} items, leave-one-out):",
             f"  {policy.name}"]
    if evidence.keys:
        lines.append(f"  key {store.key}, chosen of {len(evidence.keys)} (each calibrated at delta "
                     f"{evidence.keys[0].delta:g}): " + "; ".join(
                         f"{k.key} {100 * k.score:.2f} at {k.layers_run:.0%} of the layers"
                         + ("" if k.certified else " (not certified within the budget)") for k in evidence.keys))
    if policy.gate is not None:
        g = policy.gate
        lines.append(f"  off-domain gate: far below similarity {g.min_similarity:.3f}, disagree below "
                     f"{g.min_agreement:.3f} (each ~{g.alpha / 2:.1%} of in-domain queries), stream test at "
                     f"p {g.stream_p:g}; fallback: full depth")
    if evidence.chosen < 0:
        lines.append(f"  no setting passed its test: full depth is served (calibration score "
                     f"{100 * evidence.full_score:.2f})")
    else:
        p = evidence.curve[evidence.chosen]
        lines.append(f"  calibration score {100 * p.score:.2f} vs full depth {100 * evidence.full_score:.2f}; "
                     f"layers run {p.layers_run:.0%}; {p.off_domain:.1%} sent to full depth by the gate")
        lines.append(f"  accuracy {100 * p.accuracy:.2f} vs {100 * evidence.full_accuracy:.2f}; with probability "
                     f"{1 - s.delta:g} it is at most {100 * p.risk_bound:.2f} point(s) below full depth's")
        if s.objective == "match-full" and s.query_items:
            bound = file_risk_bound(p.harms, p.helps, evidence.num_items, tested_level(evidence, s.delta),
                                    s.query_items)
            lines.append(f"  on a file of {s.query_items} queries, at most {100 * bound:.2f} point(s) below "
                         "(normal approximation)")
    if s.objective == "match-full":
        tested = sum(p.accepted is not None for p in evidence.curve)
        lines.append(f"  {tested} settings in a fixed sequence, cautious to aggressive; accepted up to "
                     f"#{evidence.chosen + 1}" + (f", first rejection at #{evidence.chosen + 2}"
                                                   if evidence.chosen + 1 < tested else ""))
    if s.objective == "best":
        certified = sum(bool(p.accepted) for p in evidence.curve)
        if all(p.accepted is None for p in evidence.curve):
            lines.append("  built before budgets were certified: the budget was read off the calibration average, "
                         "with no guarantee (rebuild to certify it)")
        elif evidence.chosen >= 0 and not evidence.curve[evidence.chosen].accepted:
            lines.append(f"  NO setting was certified within the budget: the cheapest is served, WITHOUT the "
                         f"guarantee ({evidence.candidates} settings tried; raise --depth-budget or add items)")
        else:
            lines.append(f"  the served path: {certified} of {len(evidence.curve)} settings certified within the "
                         f"budget (betting test, fixed sequence from the cheapest; {evidence.candidates} settings "
                         "tried on all paths)")
    return "\n".join(lines)


def plot_calibration(store: ExitStore, evidence: CalibrationEvidence, path: str) -> None:
    """PNG: the calibration curve, score and accuracy-loss bound against layers run, the chosen setting marked."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = store.calibrated_policy.settings
    curve = evidence.curve
    layers = [100 * p.layers_run for p in curve]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(8, 6.5), sharex=True, gridspec_kw={"height_ratios": [3, 2]})
    accepted = [p.accepted is not False for p in curve]  # None: not tested (a store built before certification)
    known = any(p.accepted is not None for p in curve)
    top.plot(layers, [100 * p.score for p in curve], "-", color="#bdbdbd", zorder=1)
    if any(accepted):
        top.scatter([x for x, a in zip(layers, accepted) if a], [100 * p.score for p, a in zip(curve, accepted) if a],
                    s=14, color="#3182bd", label={"match-full": "setting (accepted)",
                                                  "best": "setting (certified within the budget)"}.get(s.objective,
                                                                                                         "setting")
                    if known else "setting",
                    zorder=2)
    if not all(accepted):
        top.scatter([x for x, a in zip(layers, accepted) if not a],
                    [100 * p.score for p, a in zip(curve, accepted) if not a], s=14, color="#de2d26",
                    label="setting (not tested or rejected)" if s.objective == "match-full" else
                    "setting (not certified within the budget)", zorder=2)
    top.axhline(100 * evidence.full_score, color="#636363", linestyle="--", label="full depth")
    if s.objective == "best":
        top.axvline(100 * s.depth_budget, color="#e6550d", linestyle=":", label=f"depth budget {s.depth_budget:.0%}")
    if evidence.chosen >= 0:
        chosen = curve[evidence.chosen]
        top.scatter([100 * chosen.layers_run], [100 * chosen.score], marker="*", s=250, color="#e6550d",
                    label="served", zorder=3)
    metric = "Matthews correlation x100" if store.task.metric == "mcc" else "accuracy %"
    top.set_ylabel(f"calibration {metric}")
    top.set_title(f"{store.task.name}: calibration curve ({s.objective}, {evidence.num_items} items, "
                  f"leave-one-out, key {store.key})")
    top.grid(alpha=0.3)
    top.legend(fontsize=8)
    bottom.plot(layers, [100 * p.risk_bound for p in curve], "o", markersize=3, color="#756bb1",
                label=f"{1 - s.delta:g} upper bound on the accuracy loss vs full depth")
    bottom.plot(layers, [100 * (evidence.full_accuracy - p.accuracy) for p in curve], "-", color="#bcbddc",
                label="observed accuracy loss")
    if s.objective == "match-full" and s.query_items:
        level = tested_level(evidence, s.delta)
        bottom.plot(layers, [100 * file_risk_bound(p.harms, p.helps, evidence.num_items, level, s.query_items)
                             for p in curve], "s", markersize=2.5, color="#31a354",
                    label=f"... on a file of {s.query_items} queries (normal approximation)")
    if s.objective == "match-full":
        bottom.axhline(100 * s.epsilon, color="#e6550d", linestyle="--", label=f"epsilon {100 * s.epsilon:g} point")
    bottom.axhline(0, color="#636363", linewidth=0.8)
    bottom.set_xlabel("layers run, % (the prefix key's layers counted; off-domain fallbacks at 100%)")
    bottom.set_ylabel("points")
    bottom.grid(alpha=0.3)
    bottom.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
