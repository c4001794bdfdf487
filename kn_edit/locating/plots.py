"""Figures of a located fact (matplotlib, imported only when a plot is asked for).

Uses ``matplotlib.figure.Figure`` with the Agg canvas directly, so no pyplot state or global backend is touched.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from .locate import LocateResult


def figure_formats() -> list[str]:
    """The file extensions matplotlib can write here. pgf is left out: it needs a LaTeX install to write."""
    from matplotlib.backend_bases import FigureCanvasBase

    return sorted(f for f in FigureCanvasBase.get_supported_filetypes() if f != "pgf")


def check_plot_path(path: str | Path, overwrite: bool = False) -> Path:
    """Refuse, before any computation, a plot path whose extension names no format matplotlib writes (a
    ConfigError), or that exists without ``overwrite``, is a folder or is not writable (an EditError)."""
    from ..errors import ConfigError
    from ..storage.atomic import check_new_file

    path = Path(path)
    formats = figure_formats()
    if path.suffix[1:].lower() not in formats:
        raise ConfigError(f"cannot write a picture to {path}: its extension must name a format, one of "
                          f"{', '.join(formats)} (nothing was computed)")
    return check_new_file(path, overwrite, "--overwrite")  # the option of the commands that write plots


def save_figure(fig, path: str | Path, overwrite: bool = False) -> Path:
    """Write ``fig`` to ``path`` atomically, in the format its extension names: rendered to a temporary sibling,
    then moved into place, so an interrupted write leaves no half picture and replaces nothing it should not."""
    from ..storage.atomic import atomic_file

    path = Path(path).expanduser()  # as check_plot_path sees it
    with atomic_file(path, overwrite=overwrite, what="plot") as tmp:
        fig.savefig(tmp, format=path.suffix[1:].lower())
    return path


def relative_scores(result: LocateResult) -> torch.Tensor:
    """[L_selected, d_ff]: each prompt's scores divided by that prompt's largest score, averaged over prompts.
    On this scale the per-prompt threshold is a fixed line (t) and prompts count equally."""
    peak = result.scores.flatten(1).max(dim=1).values.clamp_min(1e-30)  # [n_prompts]
    return (result.scores / peak[:, None, None]).mean(dim=0)


def binned_max(values: torch.Tensor, max_columns: int) -> tuple[torch.Tensor, int]:
    """values [L, d_ff] → ([L, ceil(d_ff / width)], width): the maximum over bins of ``width`` neurons, so that
    single strong neurons stay visible at any figure width."""
    d_ff = values.shape[1]
    width = max(1, math.ceil(d_ff / max_columns))
    pad = (-d_ff) % width
    padded = torch.nn.functional.pad(values, (0, pad), value=float("-inf"))
    return padded.view(values.shape[0], -1, width).max(dim=2).values, width


def plot_locate(result: LocateResult, path: str | Path, max_columns: int = 256, title: str | None = None,
                overwrite: bool = False) -> Path:
    """Write a picture, in the format the extension of ``path`` names (``overwrite``: replace an existing file):
    left, a layer × neuron heatmap of the relative attribution (max over bins of neurons) with the located
    neurons circled; right, per layer the neurons above threshold for some prompt and the located ones."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.colors import PowerNorm
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    path = Path(path)
    rel = relative_scores(result).clamp_min(0.0)
    binned, width = binned_max(rel, max_columns)
    n_rows = len(result.layers)
    fig = Figure(figsize=(12, max(4.5, 0.22 * n_rows + 1.8)), dpi=120, layout="constrained")
    FigureCanvasAgg(fig)
    heat_ax, bar_ax = fig.subplots(1, 2, gridspec_kw={"width_ratios": [5, 1]}, sharey=True)

    image = heat_ax.imshow(binned.numpy(), aspect="auto", origin="lower", interpolation="nearest", cmap="magma",
                           norm=PowerNorm(gamma=0.5, vmin=0.0, vmax=1.0), extent=(0, result.scores.shape[2], -0.5, n_rows - 0.5))
    row_of = {l: r for r, l in enumerate(result.layers)}
    if result.neurons:
        heat_ax.scatter([n.index + 0.5 * width for n in result.neurons], [row_of[n.layer] for n in result.neurons],
                        s=70, facecolors="none", edgecolors="cyan", linewidths=1.4)
        for n in result.neurons[:12]:
            heat_ax.annotate(str(n), (n.index, row_of[n.layer]), xytext=(4, 4), textcoords="offset points", color="cyan",
                             fontsize=7)
    binning = f", each column the max over {width} neurons" if width > 1 else ""
    heat_ax.set_xlabel(f"neuron index{binning}; circles: located neurons")
    heat_ax.set_ylabel("layer")
    tick_step = max(1, n_rows // 16)
    heat_ax.set_yticks(range(0, n_rows, tick_step), [str(result.layers[r]) for r in range(0, n_rows, tick_step)])
    fig.colorbar(image, ax=heat_ax, pad=0.01, label="score / prompt max, mean over prompts")

    above = result.kept.any(dim=0).sum(dim=1).tolist()  # [L]
    located = [0] * n_rows
    for n in result.neurons:
        located[row_of[n.layer]] += 1
    ys = list(range(n_rows))
    bar_ax.barh(ys, above, color="#9ab", label=f"> {result.threshold:g}·max (any prompt)")
    bar_ax.barh(ys, located, color="#d33", label="located")
    bar_ax.set_xlabel("neurons")
    bar_ax.xaxis.set_major_locator(MaxNLocator(nbins=4, integer=True))
    bar_ax.legend(loc="lower center", bbox_to_anchor=(0.5, 1.0), fontsize=7, frameon=False)
    bar_ax.tick_params(labelleft=False)

    n_prompts = len(result.prompts)
    fig.suptitle(
        title
        or f"{result.target!r}: {len(result.neurons)} knowledge neurons from {n_prompts} prompt{'s' * (n_prompts > 1)} "
        f"(t={result.threshold:g}, p={result.share:g})",
        fontsize=11,
    )
    return save_figure(fig, path, overwrite)
