"""torchmetrics Metrics for evaluating edits. Each keeps sums (``dist_reduce_fx="sum"``, or ``"max"``) so that
results aggregate exactly across processes; the math is in ``functional.py``."""

from __future__ import annotations

import torch
from torchmetrics import Metric

from . import functional as Fn
from .benchmark_metrics import summary as benchmark_summary
from .report import RETENTION, phase_order


def _state(metric: Metric, name: str, reduce: str = "sum", init: float = 0.0, shape: tuple[int, ...] = ()) -> None:
    metric.add_state(name, default=torch.full(shape, init, dtype=torch.float64), dist_reduce_fx=reduce)


def edit_success_summary(n_facts, top1, new_beats_old, delta_p_new) -> dict[str, torch.Tensor]:
    """EditSuccess's result from its sums (float64 tensors): the per-fact means macro-averaged over facts."""
    nan = torch.tensor(float("nan"), dtype=torch.float64, device=n_facts.device)
    sums = {"top1": top1, "new_beats_old": new_beats_old, "delta_p_new": delta_p_new}
    return {k: v / n_facts if n_facts > 0 else nan for k, v in sums.items()} | {"n_facts": n_facts}


def retention_summary(n, correct_before, correct_after, kept, nll_before, nll_after) -> dict[str, torch.Tensor]:
    """Retention's result from its sums (float64 tensors, the keys of ``functional.retention_counts``)."""
    nan = torch.tensor(float("nan"), dtype=torch.float64, device=n.device)
    ratio = lambda a, b: a / b if b > 0 else nan  # noqa: E731
    ppl_before = Fn.perplexity(nll_before, n).to(n.device)
    ppl_after = Fn.perplexity(nll_after, n).to(n.device)
    return {
        "acc_before": ratio(correct_before, n),
        "acc_after": ratio(correct_after, n),
        "retained": ratio(kept, correct_before),
        "ppl_before": ppl_before,
        "ppl_after": ppl_after,
        "ppl_change": Fn.relative_change(ppl_before, ppl_after),
        "n_prompts": n,
    }


class EditSuccess(Metric):
    """Edit success on a set of prompts of each edited fact, macro-averaged over facts: the share of prompts
    where the new object is top-1, where P(new) > P(old), and the mean ΔP(new). Used for the edit prompts
    ("edit") and for the held-out paraphrases ("generalization"). A fact with no prompts is not counted."""

    full_state_update = False
    higher_is_better = True

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        for name in ("n_facts", "top1", "new_beats_old", "delta_p_new"):
            _state(self, name)

    def update(self, new_top1, logp_new_after, logp_old_after, logp_new_before) -> None:  # each [n_prompts]
        if len(new_top1) == 0:
            return
        stats = Fn.edit_success(new_top1, logp_new_after, logp_old_after, logp_new_before)
        self.n_facts += 1
        for key, value in stats.items():
            setattr(self, key, getattr(self, key) + value.double())

    def compute(self) -> dict[str, torch.Tensor]:
        return edit_success_summary(self.n_facts, self.top1, self.new_beats_old, self.delta_p_new)


class Retention(Metric):
    """What an edit does to facts it should leave alone (prompts of other facts, gold objects), pooled over
    edits: accuracy before and after, the share of correct answers kept (correct before and after / correct
    before), and the paper's PPL = exp(mean −log P(gold)) before and after."""

    full_state_update = False

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        for name in ("n", "correct_before", "correct_after", "kept", "nll_before", "nll_after"):
            _state(self, name)

    def update(self, correct_before, correct_after, logp_before, logp_after) -> None:  # each [n_prompts]
        for key, value in Fn.retention_counts(correct_before, correct_after, logp_before, logp_after).items():
            setattr(self, key, getattr(self, key) + value.double())

    def compute(self) -> dict[str, torch.Tensor]:
        return retention_summary(self.n, self.correct_before, self.correct_after, self.kept, self.nll_before,
                                 self.nll_after)  # fmt: skip


class PerplexityDrift(Metric):
    """Change of corpus perplexity on held-out text caused by each edit: the mean and the largest relative
    change over edits; the mean log ratio ln(PPL_after / PPL_before) (robust to the odd edit that wrecks the
    model); the share of edits that raise perplexity by more than ``large`` (relative); and the pooled
    perplexity before and after."""

    full_state_update = False
    higher_is_better = False

    def __init__(self, large: float = 0.1, **kwargs) -> None:
        super().__init__(**kwargs)
        self.large = large
        for name in ("n_edits", "change_sum", "log_ratio_sum", "n_large", "nll_before", "tokens_before", "nll_after",
                     "tokens_after"):  # fmt: skip
            _state(self, name)
        _state(self, "change_max", reduce="max", init=float("-inf"))

    def update(self, nll_before, tokens_before, nll_after, tokens_after) -> None:  # scalars, one edit
        change = Fn.relative_change(Fn.perplexity(nll_before, tokens_before), Fn.perplexity(nll_after, tokens_after))
        change = change.to(self.change_sum.device).double()
        self.n_edits += 1
        self.change_sum += change
        self.change_max = torch.maximum(self.change_max, change)
        log_ratio = nll_after.double() / tokens_after.double() - nll_before.double() / tokens_before.double()
        self.log_ratio_sum += log_ratio.to(self.log_ratio_sum.device)
        self.n_large += (change > self.large).double()
        self.nll_before += nll_before.double()
        self.tokens_before += tokens_before.double()
        self.nll_after += nll_after.double()
        self.tokens_after += tokens_after.double()

    def compute(self) -> dict[str, torch.Tensor]:
        nan = torch.tensor(float("nan"), dtype=torch.float64, device=self.n_edits.device)
        return {
            "mean_change": self.change_sum / self.n_edits if self.n_edits > 0 else nan,
            "max_change": self.change_max if self.n_edits > 0 else nan,
            "mean_log_ratio": self.log_ratio_sum / self.n_edits if self.n_edits > 0 else nan,
            "share_large": self.n_large / self.n_edits if self.n_edits > 0 else nan,
            "ppl_before": Fn.perplexity(self.nll_before, self.tokens_before).to(nan.device),
            "ppl_after": Fn.perplexity(self.nll_after, self.tokens_after).to(nan.device),
            "n_edits": self.n_edits,
        }


class GroupedMean(Metric):
    """Mean of values per group (e.g. the suppress/amplify change ratio per relation): [n_groups], NaN for a
    group without values."""

    full_state_update = False

    def __init__(self, n_groups: int, **kwargs) -> None:
        super().__init__(**kwargs)
        if n_groups < 1:
            raise ValueError(f"GroupedMean needs at least one group, got {n_groups}")
        _state(self, "total", shape=(n_groups,))
        _state(self, "count", shape=(n_groups,))

    def update(self, values: torch.Tensor, groups: torch.Tensor) -> None:  # [n], [n] long
        if values.shape != groups.shape or values.dim() != 1:
            raise ValueError(f"GroupedMean: values and groups must be [n]; got {tuple(values.shape)}, {tuple(groups.shape)}")
        groups = groups.to(self.total.device)
        self.total.index_add_(0, groups, values.to(self.total.device).double())
        self.count.index_add_(0, groups, torch.ones_like(self.total[groups]))

    def compute(self) -> torch.Tensor:
        return torch.where(self.count > 0, self.total / self.count.clamp(min=1), torch.full_like(self.total, float("nan")))


def row_metrics(rows: list[dict]) -> dict[str, float]:
    """The metrics of a single-edit run (EditEvaluation) that follow from its per-fact rows alone, by the formulas
    the Metrics above use: edit success and generalization, the retention slices, refused edits, the text
    perplexity's mean and largest change, fluency, facts probed, seconds and peak memory per edit. (The rows keep
    rounded text perplexities, so the other drift figures and the probe's pooled ratios are not recomputed.)
    A kept result whose metrics disagree with these was altered."""
    f64 = lambda value: torch.tensor(float(value), dtype=torch.float64)  # noqa: E731
    out: dict[str, float] = {}
    for section in ("edit", "generalization"):
        facts = [r[section] for r in rows if section in r]
        sums = {k: f64(sum(f[k] for f in facts)) for k in ("top1", "new_beats_old", "delta_p_new")}
        out |= {f"{section}/{k}": float(v) for k, v in edit_success_summary(f64(len(facts)), **sums).items()}
    held = [r["generalization"] for r in rows if "n_subject_first" in r.get("generalization", {})]
    for part in ("first", "inside") if held else ():  # rows of a kn-edit without the split have none
        shares = [h[f"top1_subject_{part}"] for h in held if f"top1_subject_{part}" in h]
        out[f"generalization/top1_subject_{part}"] = sum(shares) / len(shares) if shares else float("nan")
    for section in RETENTION:
        counts = [r[section] for r in rows if section in r]
        keys = ("n", "correct_before", "correct_after", "kept", "nll_before", "nll_after")
        out |= {f"{section}/{k}": float(v)
                for k, v in retention_summary(**{k: f64(sum(c[k] for c in counts)) for k in keys}).items()}  # fmt: skip
    out["run/edit_errors"] = float(sum("error" in r for r in rows))
    changes = [r["text_ppl"]["after"] / r["text_ppl"]["before"] - 1 for r in rows if "text_ppl" in r]
    if changes:
        out["drift/mean_change"], out["drift/max_change"] = sum(changes) / len(changes), max(changes)
    entropies = [r["fluency"] for r in rows if "fluency" in r]
    for key in ("entropy_before", "entropy_after") if entropies else ():
        out[f"fluency/{key}"] = sum(e[key] for e in entropies) / len(entropies)
    if any("probe" in r or "probe_error" in r for r in rows):
        out["probe/facts"] = float(sum("probe" in r for r in rows))
    out |= benchmark_summary(rows)
    reports = [r["editor"]["report"] for r in rows if (r.get("editor") or {}).get("report") is not None]
    out["edit/seconds"] = sum(r["seconds"] for r in reports) / len(reports) if reports else float("nan")
    peaks = [r["peak_memory_mb"] for r in reports if r["peak_memory_mb"] is not None]
    if peaks:
        out["run/peak_memory_mb"] = max(peaks)
    return out


def phase_seconds(rows: list[dict]) -> dict[str, float]:
    """Mean seconds per edit of each phase of the edits' reports (``EditReport.timings``), over the rows whose
    edit was made (as ``edit/seconds``), phases in the order first seen, "other" last; a phase an edit did not
    enter counts 0 for it, so the means add up to the mean seconds per edit. Empty where no row has timings
    (e.g. rows of an older kn-edit). Rows: a single-edit run's (report under "editor") or a sequential run's."""
    reports = [r.get("report") or (r.get("editor") or {}).get("report") for r in rows]
    timings = [t for t in ((rep or {}).get("timings") for rep in reports) if t]
    return {p: sum(t.get(p, 0.0) for t in timings) / len(timings) for p in phase_order(timings)} if timings else {}
