"""Comparing a run's metrics with a committed baseline: a metric regresses when it moved in its bad direction
by more than its tolerance (absolute difference of the metric's value)."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

from ..errors import ConfigError

# Direction of each metric family: +1 higher is better, -1 lower is better. Matched on the name's suffix.
_HIGHER = ("top1", "new_beats_old", "delta_p_new", "acc_after", "retained", "entropy_after", "entropy_change",
           "top1_subject_first", "top1_subject_inside")
# The field's benchmark tables (evaluation/benchmark_metrics.py): every score is higher-is-better, magnitudes and
# generation-based accuracy included; the unedited model's multi-hop accuracy is not a property of an edit.
_BENCHMARKS = ("counterfact/", "zsre/", "knowedit/", "mquake/")
_LOWER = ("ppl_after", "ppl_change", "mean_change", "max_change", "mean_log_ratio", "share_large", "edit_errors",
          "seconds", "peak_memory_mb")
_SIGNED = {"probe/suppressed": -1, "probe/amplified": +1}  # the located neurons should matter


def direction(metric: str) -> int:
    """+1 (higher is better) or -1; a comparison's ``label:metric`` keys go by the metric."""
    metric = metric.rpartition(":")[2]
    if metric in _SIGNED:
        return _SIGNED[metric]
    suffix = metric.rsplit("/", 1)[-1]
    if metric.startswith(_BENCHMARKS) and metric != "mquake/multihop_before":
        return +1
    if suffix in _HIGHER:
        return +1
    if suffix in _LOWER:
        return -1
    raise ConfigError(f"no known direction (higher or lower is better) for metric {metric!r}; it cannot be gated")


@dataclass(frozen=True)
class Regression:
    metric: str
    baseline: float
    value: float
    tolerance: float

    def __str__(self) -> str:
        better = "higher" if direction(self.metric) > 0 else "lower"
        return (f"{self.metric}: {self.value:.4g} vs baseline {self.baseline:.4g} "
                f"({better} is better, tolerance {self.tolerance:g})")  # fmt: skip


def load_metrics(path: str | Path) -> dict[str, float]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"baseline metrics not found: {path}")
    data = json.loads(path.read_text())
    return data.get("metrics", data)


def compare(metrics: dict[str, float], baseline: dict[str, float], tolerances: dict[str, float]) -> list[Regression]:
    """The metrics that regressed beyond tolerance (a metric missing or NaN in the run counts as regressed)."""
    out = []
    for name, tolerance in tolerances.items():
        if name not in baseline:
            raise ConfigError(f"tolerance given for {name!r}, which the baseline does not have")
        sign, base = direction(name), float(baseline[name])
        value = float(metrics.get(name, float("nan")))
        if math.isnan(value) or sign * (value - base) < -float(tolerance):
            out.append(Regression(name, base, value, float(tolerance)))
    return out
