"""Human-readable summaries of exit records: per-layer accuracy and where items first become right."""

from __future__ import annotations

import numpy as np

from raee.records import ExitRecords

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
