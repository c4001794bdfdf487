"""Figures of a run: per-relation bars (edit success, generalization, interference) and the suppress/amplify
change ratios with the random-neuron control (the paper's figure 3)."""

from __future__ import annotations

import math
from pathlib import Path


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only, never a window
    import matplotlib.pyplot as plt

    return plt


def _bars(ax, relations, series: dict[str, list[float]], title: str, ylabel: str) -> None:
    width = 0.8 / max(len(series), 1)
    for i, (label, values) in enumerate(series.items()):
        xs = [x + (i - (len(series) - 1) / 2) * width for x in range(len(relations))]
        ax.bar(xs, values, width, label=label)  # NaN (nothing measured) draws no bar
    ax.set_xticks(range(len(relations)))
    ax.set_xticklabels(relations, rotation=60, ha="right", fontsize=8)
    ax.set_title(title)
    ax.set_ylabel(ylabel)
    # Below the relation labels, so it never hides a bar.
    ax.legend(fontsize=8, ncol=len(series), loc="upper center", bbox_to_anchor=(0.5, -0.28), frameon=False)
    ax.grid(axis="y", alpha=0.3)


def relation_figure(per_relation: dict[str, dict[str, float]], path: Path) -> Path:
    plt = _pyplot()
    relations = list(per_relation)
    get = lambda key: [per_relation[r].get(key, float("nan")) for r in relations]  # noqa: E731
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(max(6, 0.45 * len(relations) + 2), 8))
    _bars(top, relations, {"edit prompts": get("edit/top1"), "held-out paraphrases": get("generalization/top1")},
          "Edit success per relation (new object top-1)", "share of prompts")  # fmt: skip
    top.set_ylim(0, 1.05)
    _bars(bottom, relations, {"same relation": get("intra/retained"), "other relations": get("inter/retained")},
          "Interference: other facts' top-1 answers kept after the edit", "share kept")  # fmt: skip
    bottom.set_ylim(0, 1.05)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def probe_figure(per_relation: dict[str, dict[str, float]], path: Path) -> Path:
    plt = _pyplot()
    relations = [r for r, v in per_relation.items() if any(not math.isnan(x) for x in v.values())]
    get = lambda key: [100 * per_relation[r][key] for r in relations]  # noqa: E731
    fig, (left, right) = plt.subplots(1, 2, figsize=(max(8, 0.6 * len(relations) + 4), 4.6))
    _bars(left, relations, {"knowledge neurons": get("suppressed"), "random neurons": get("control_suppressed")},
          "Suppressing (activation set to 0)", "change of P(correct answer) [%]")  # fmt: skip
    _bars(right, relations, {"knowledge neurons": get("amplified"), "random neurons": get("control_amplified")},
          "Amplifying (activation doubled)", "change of P(correct answer) [%]")  # fmt: skip
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# (metric, label, panel) of the method comparison figure: shares in [0, 1] on top, costs below.
_COMPARED = (
    ("edit/top1", "edit top-1", 0),
    ("generalization/top1", "paraphrase top-1", 0),
    ("intra_same/retained", "same relation, same object kept", 0),
    ("intra_other/retained", "same relation, other object kept", 0),
    ("inter/retained", "other relations kept", 0),
    ("drift/mean_change", "text ppl change (mean)", 1),
    ("drift/max_change", "text ppl change (max)", 1),
)


def comparison_figure(methods: dict[str, dict[str, float]], path: Path) -> Path:
    """Editing methods side by side: success, generalization and what they keep (top); text damage (bottom)."""
    plt = _pyplot()
    names = list(methods)
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(max(7, 1.2 * len(names) + 4), 8))
    for ax, panel in ((top, 0), (bottom, 1)):
        keys = [(k, label) for k, label, p in _COMPARED if p == panel]
        series = {name: [methods[name].get(k, float("nan")) for k, _ in keys] for name in names}
        _bars(ax, [label for _, label in keys], series,
              "Editing methods on the same facts" if panel == 0 else "Plain-text perplexity change per edit",
              "share" if panel == 0 else "relative change")  # fmt: skip
    top.set_ylim(0, 1.05)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


_CURVES = (("edits/held", "edits still held"), ("generalization/top1", "paraphrases top-1"),
           ("intra/retained", "same relation kept"), ("inter/retained", "other relations kept"),
           ("drift/change", "text perplexity change"), ("fluency/entropy", "generation fluency (n-gram entropy)"))


def curve_figure(curves: dict[str, list[dict]], path: Path) -> Path:
    """Sequential editing: each metric against the number of edits made, one line per method."""
    plt = _pyplot()
    fig, axes = plt.subplots(2, 3, figsize=(13, 7))
    for ax, (key, title) in zip(axes.flat, _CURVES):
        for method, points in curves.items():
            xs = [p["n_edits"] for p in points if key in p]
            ax.plot(xs, [p[key] for p in points if key in p], marker="o", label=method)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("edits made")
        ax.grid(alpha=0.3)
    axes.flat[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
