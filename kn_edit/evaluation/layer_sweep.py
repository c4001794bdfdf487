"""``kn-edit choose-layer``: the edit layer of a key-value method measured on one model, by a small sweep.

Every candidate layer edits the same facts the model knows (one comparison, one labelled method per layer:
``layerL``; MEMIT's range ends at L and spans ``memit_span`` layers), and the layer with the best score is kept
for the model and method (kn_edit.editing.keyvalue.layer_choice), so later edits of that model use it. The score
weighs what the issue asks an edit to do and not to do, each a rate over the sweep's facts:

    score = mean(edit top-1, held-out paraphrase top-1, same-object neighbours kept, other-relation facts kept)
            − mean relative text perplexity change

A layer whose edits fail, generalize poorly or move other subjects' facts scores low; ties go to the lower
layer (the first of the best). The comparison's report (every layer's metrics) is written as ``compare`` writes
it, and the table goes into the choice file with the date, facts and command.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any, Sequence

from ..editing.keyvalue.layer_choice import METHODS, save_measured
from ..errors import ConfigError
from ..progress import NullReporter, Reporter
from .compare import CompareResult, compare_methods
from .config import CompareConfig, MethodEntry, RunConfig

if TYPE_CHECKING:
    from ..models.model import KnModel

# The rates the score averages (metric key, label in the table).
SCORED = (("edit/top1", "edit top-1"), ("generalization/top1", "paraphrase top-1"),
          ("intra_same/retained", "same object kept"), ("inter/retained", "other relations kept"))
TEXT = ("drift/mean_change", "text ppl change")


@dataclass
class LayerSweepConfig(RunConfig):
    """A layer sweep (``configs/layers/*.yaml``): the comparison's data, text and measuring settings, plus which
    method and which layers."""

    name: str = "layers"
    method: str = "rome"  # rome | kn-subject | memit
    layers: list[int] = field(default_factory=list)  # candidates; empty: every layer from 1 to two thirds of the depth
    settings: dict[str, Any] = field(default_factory=dict)  # the method's other settings, the same at every layer
    memit_span: int = 3  # memit: the range ending at each candidate has this many layers
    save: bool = True  # keep the chosen layer for the model in $KN_EDIT_CACHE/layers (false: only report it)

    def check(self) -> "LayerSweepConfig":
        super().check()
        if self.method not in METHODS:
            raise ConfigError(f"method must be one of {', '.join(METHODS)}, got {self.method!r}")
        if any(isinstance(x, bool) or not isinstance(x, int) or x < 0 for x in self.layers):
            raise ConfigError(f"layers must be layer indices >= 0, got {list(self.layers)}")
        if len(set(self.layers)) != len(self.layers):
            raise ConfigError(f"layers must differ, got {list(self.layers)}")
        if "layer" in self.settings or "layers" in self.settings:
            raise ConfigError("settings: leave out layer/layers, the sweep sets them (list the candidates in layers)")
        if isinstance(self.memit_span, bool) or not isinstance(self.memit_span, int) or self.memit_span < 1:
            raise ConfigError(f"memit_span must be an integer >= 1, got {self.memit_span!r}")
        return self


@dataclass
class LayerSweep:
    """The sweep's table (one row per candidate: its layers, the scored rates, the text change, the score), the
    chosen row, the comparison, and where the choice was kept (None: not saved)."""

    rows: list[dict]
    chosen: dict
    comparison: CompareResult
    saved_to: str | None = None


def candidates(config: LayerSweepConfig, n_layers: int) -> list[int]:
    """The configured candidates, else every layer from 1 to two thirds of the depth (the subject's key must
    reach the answer through later layers); each checked against the model."""
    layers = list(config.layers) or list(range(1, max(2, (2 * n_layers) // 3 + 1)))
    bad = [x for x in layers if x >= n_layers]
    if bad:
        raise ConfigError(f"layers {bad} do not exist: the model has {n_layers} layers (0..{n_layers - 1})")
    return sorted(layers)


def layer_settings(config: LayerSweepConfig, layer: int) -> dict:
    """The method's settings at one candidate (MEMIT: the ``memit_span`` layers ending at it)."""
    if config.method == "memit":
        return {**config.settings, "layers": list(range(max(0, layer - config.memit_span + 1), layer + 1))}
    return {**config.settings, "layer": layer}


def score(metrics: dict[str, float]) -> float:
    """The module docstring's score; NaN rates (nothing of that kind measured) are left out of the mean."""
    rates = [metrics.get(key, math.nan) for key, _ in SCORED]
    rates = [r for r in rates if r is not None and not math.isnan(r)]
    if not rates:
        return -math.inf
    text = metrics.get(TEXT[0], 0.0)
    return sum(rates) / len(rates) - (0.0 if text is None or math.isnan(text) else text)


def sweep_layers(config: LayerSweepConfig, km: KnModel | None = None, reporter: Reporter | None = None,
                 write: bool = True, facts=None, passages: Sequence[str] | None = None,
                 layers_dir: str | None = None) -> LayerSweep:
    """Run the sweep (one comparison), choose the layer, keep it (``config.save``; ``layers_dir``: another folder
    than $KN_EDIT_CACHE/layers, for tests)."""
    from ..models.loading import load

    config.check()
    reporter = reporter or NullReporter()
    km = km if km is not None else load(config.model, device="cpu", reporter=reporter)
    layers = candidates(config, km.n_layers)
    shared = {f: getattr(config, f) for f in RunConfig.__dataclass_fields__}
    compare = CompareConfig(**shared, methods=[MethodEntry(config.method, f"layer{x}", layer_settings(config, x))
                                               for x in layers])  # fmt: skip
    compare.name = f"{config.name}_{config.method}"
    result = compare_methods(compare, km=km, facts=facts, passages=passages, reporter=reporter, write=write)
    rows = []
    for x, entry in zip(layers, compare.methods):
        metrics = result.results[entry.title].metrics
        row = {"layer": x, "layers": entry.settings.get("layers", [x]),
               **{key: metrics.get(key) for key, _ in SCORED}, TEXT[0]: metrics.get(TEXT[0]),
               "refused": metrics.get("run/edit_errors"), "score": score(metrics)}
        rows.append(row)
    chosen = max(rows, key=lambda r: r["score"])  # max keeps the first of equal scores: the lower layer
    sweep = LayerSweep(rows, chosen, result)
    if config.save:
        facts_edited = next(iter(result.results.values())).summary.get("facts_edited")
        about = {"chosen_layer": chosen["layer"], "score": chosen["score"], "facts": facts_edited,
                 "settings": dict(config.settings), "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                 "comparison": str(result.run_dir) if result.run_dir is not None else None}  # fmt: skip
        sweep.saved_to = str(save_measured(km, config.method, chosen["layers"], rows, about, layers_dir))
    return sweep


__all__ = ["LayerSweep", "LayerSweepConfig", "SCORED", "candidates", "layer_settings", "score", "sweep_layers"]
