"""Figures of the analyses (matplotlib ``Figure`` with the Agg canvas: no pyplot state, imported on use)."""

from __future__ import annotations

import math
from pathlib import Path


def _figure(width: float, height: float, cols: int = 1, rows: int = 1):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(rows, cols, squeeze=False)
    return fig, [ax for row in axes for ax in row]


def distribution_figure(d, path: str | Path, title: str = "") -> Path:
    """Left: share of knowledge neurons per layer; right: neurons per fact per relation (mean, sd bars)."""
    fig, (left, right) = _figure(12, 4.5, cols=2)
    left.bar(range(d.n_layers), d.layer_shares, color="tab:blue")
    left.set_xlabel("layer")
    left.set_ylabel("share of knowledge neurons")
    left.set_title("Knowledge neurons per layer")
    rels = d.per_relation
    right.bar(range(len(rels)), [r.mean for r in rels], yerr=[r.std for r in rels], capsize=3, color="tab:orange")
    right.set_xticks(range(len(rels)))
    right.set_xticklabels([r.relation for r in rels], rotation=60, ha="right", fontsize=8)
    right.set_ylabel("neurons per fact (mean ± sd)")
    pct = lambda s: "no pairs" if s.pairs == 0 else f"{s.share:.0%} of {s.pairs}"  # noqa: E731
    right.set_title(f"Per relation; fact pairs sharing ≥1 neuron: same relation {pct(d.within)}, "
                    f"different relations {pct(d.across)}", fontsize=9)  # fmt: skip
    if title:
        fig.suptitle(title)
    fig.savefig(path)
    return Path(path)


def activations_figure(result, path: str | Path, title: str = "") -> Path:
    """Per relation and overall: mean activation of the facts' neurons per prompt type (± sd)."""
    from .activations import GROUPS

    names = list(result.per_relation) + ["all"]
    summaries = list(result.per_relation.values()) + [result.overall]
    labels = {"own": "own prompts", "same_relation": "same relation", "other_relation": "other relations",
              "wiki": "wiki sentences (peak)"}  # fmt: skip
    fig, (ax,) = _figure(max(7, 0.9 * len(names) + 3), 4.8)
    width = 0.8 / len(GROUPS)
    for g_i, g in enumerate(GROUPS):
        xs = [x + (g_i - 1.5) * width for x in range(len(names))]
        means = [s.groups[g].mean for s in summaries]
        sds = [0 if math.isnan(s.groups[g].std) else s.groups[g].std for s in summaries]
        ax.bar(xs, means, width, yerr=sds, capsize=2, label=labels[g])
    ax.axhline(0, color="black", linewidth=0.6)
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels(names, rotation=60, ha="right", fontsize=8)
    ax.set_ylabel("mean activation of the fact's neurons")
    ax.legend(fontsize=8)
    ax.set_title(title or "Knowledge-neuron activation by prompt type")
    fig.savefig(path)
    return Path(path)


def trace_figure(result, path: str | Path, overwrite: bool = False) -> Path:
    """One heatmap per traced kind: indirect effect, tokens × layers (subject tokens marked with *). Written
    atomically to a path the user names (its format from the extension; ``overwrite`` replaces a file)."""
    from ..locating.plots import save_figure

    kinds = list(result.effects)
    labels = {"hidden": "hidden state", "mlp": "MLP output", "attn": "attention output"}
    n_tok = len(result.tokens)
    fig, axes = _figure(4.2 * len(kinds), max(3.0, 0.35 * n_tok + 1.6), cols=len(kinds))
    s0, s1 = result.subject_positions
    names = [f"{t!r}*" if s0 <= i < s1 else repr(t) for i, t in enumerate(result.tokens)]
    for ax, kind in zip(axes, kinds):
        grid = result.effects[kind].t().numpy()  # [tokens, layers]
        image = ax.imshow(grid, aspect="auto", cmap="Purples" if kind == "hidden" else "Greens" if kind == "mlp" else "Reds",
                          interpolation="nearest")  # fmt: skip
        ax.set_yticks(range(n_tok))
        ax.set_yticklabels(names, fontsize=7)
        ax.set_xlabel("layer")
        window = f", window {result.window}" if result.window > 1 and kind != "hidden" else ""
        ax.set_title(f"restore {labels[kind]}{window}", fontsize=9)
        fig.colorbar(image, ax=ax, shrink=0.8, label="indirect effect on P(target)")
    fig.suptitle(f"{result.prompt!r} → {result.target!r}: P clean {result.clean_prob:.3f}, corrupted "
                 f"{result.corrupted_prob:.3f} ({result.samples} noise samples)", fontsize=9)  # fmt: skip
    return save_figure(fig, path, overwrite)


def where_figure(result, path: str | Path, title: str = "") -> Path:
    """Left: per relation, the knowledge neurons' mean layer and the tracing MLP peak layer (mean ± sd over
    facts); right: over all facts, the share of knowledge neurons per layer and the mean MLP effect profile."""
    from .where import summarize

    per = result.per_relation()
    names = list(per)
    fig, (left, right) = _figure(13, 4.8, cols=2)
    xs = list(range(len(names)))
    kn = [per[r]["kn_mean_layer"] if per[r]["kn_mean_layer"] is not None else float("nan") for r in names]
    kn_sd = [per[r]["kn_layer_sd"] or 0 for r in names]
    tr = [per[r]["trace_mean_peak_layer"] for r in names]
    tr_sd = [per[r]["trace_peak_sd"] or 0 for r in names]
    left.errorbar([x - 0.1 for x in xs], kn, yerr=kn_sd, fmt="o", capsize=3, label="knowledge neurons (mean layer)")
    left.errorbar([x + 0.1 for x in xs], tr, yerr=tr_sd, fmt="s", capsize=3, label="causal tracing (MLP peak layer)")
    left.set_xticks(xs)
    left.set_xticklabels(names, rotation=60, ha="right", fontsize=8)
    left.set_ylim(-0.5, result.n_layers - 0.5)
    left.set_ylabel("layer")
    left.legend(fontsize=8)
    left.set_title("Per relation (mean ± sd over facts)", fontsize=9)
    overall = summarize(result.facts, result.n_layers)
    layers = list(range(result.n_layers))
    right.bar(layers, overall["kn_layer_share"], color="tab:blue", alpha=0.6, label="share of knowledge neurons")
    right.set_xlabel("layer")
    right.set_ylabel("share of knowledge neurons")
    twin = right.twinx()
    twin.plot(layers, overall["trace_mlp_profile"], color="tab:green", marker=".", label="MLP indirect effect")
    twin.set_ylabel("mean MLP indirect effect (subject's last token)")
    right.set_title(f"All {len(result.facts)} facts", fontsize=9)
    right.legend(loc="upper left", fontsize=8)
    twin.legend(loc="upper right", fontsize=8)
    if title:
        fig.suptitle(title)
    fig.savefig(path)
    return Path(path)
