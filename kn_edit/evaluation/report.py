"""Writing a run directory: per-fact JSONL, metrics JSON, markdown report."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Iterable, Mapping

from .benchmark_metrics import table_columns

# (metric, label) of the summary table, in display order.
SUMMARY = (
    ("edit/top1", "edit success: new object top-1 (edit prompts)"),
    ("edit/new_beats_old", "edit: P(new) > P(old)"),
    ("edit/delta_p_new", "edit: mean ΔP(new)"),
    ("generalization/top1", "generalization: new top-1 (held-out paraphrases)"),
    ("generalization/new_beats_old", "generalization: P(new) > P(old)"),
    ("generalization/delta_p_new", "generalization: mean ΔP(new)"),
    ("generalization/top1_subject_first", "generalization: new top-1, paraphrases that begin with the subject"),
    ("generalization/top1_subject_inside", "generalization: new top-1, paraphrases with the subject inside"),
    ("intra/retained", "intra-relation: top-1 answers kept"),
    ("intra_same/retained", "intra-relation, same object as the edited fact: kept"),
    ("intra_other/retained", "intra-relation, another object: kept"),
    ("intra/acc_before", "intra-relation: accuracy before"),
    ("intra/acc_after", "intra-relation: accuracy after"),
    ("intra/ppl_before", "intra-relation PPL before"),
    ("intra/ppl_after", "intra-relation PPL after"),
    ("inter/retained", "inter-relation: top-1 answers kept"),
    ("inter/acc_before", "inter-relation: accuracy before"),
    ("inter/acc_after", "inter-relation: accuracy after"),
    ("inter/ppl_before", "inter-relation PPL before"),
    ("inter/ppl_after", "inter-relation PPL after"),
    ("drift/mean_change", "text perplexity: mean relative change per edit"),
    ("drift/max_change", "text perplexity: largest relative change"),
    ("drift/mean_log_ratio", "text perplexity: mean ln(after / before) per edit"),
    ("drift/share_large", "text perplexity: share of edits raising it > 10 %"),
    ("drift/ppl_before", "text perplexity before"),
    ("fluency/entropy_before", "generation fluency (n-gram entropy) before"),
    ("fluency/entropy_after", "generation fluency (n-gram entropy) after"),
    ("probe/suppressed", "suppress knowledge neurons: ΔP/P"),
    ("probe/control_suppressed", "suppress random neurons: ΔP/P"),
    ("probe/amplified", "amplify knowledge neurons: ΔP/P"),
    ("probe/control_amplified", "amplify random neurons: ΔP/P"),
    ("edit/seconds", "seconds per edit"),
    ("run/peak_memory_mb", "peak memory (MB)"),
    ("edit/n_facts", "facts edited"),
    ("run/edit_errors", "facts the editor refused"),
)


RETENTION = ("intra", "intra_same", "intra_other", "inter")  # the interference slices of a per-fact row


def phase_order(timings: Iterable[Mapping[str, float]]) -> list[str]:
    """The phases of several edits' timings (``EditReport.timings``), in the order first seen, "other" last."""
    return [p for p in dict.fromkeys(p for t in timings for p in t) if p != "other"] + ["other"]


def timing_markdown(timings: Mapping[str, Mapping[str, float]]) -> list[str]:
    """The section "where the time goes": per method, the mean seconds per edit of each phase of its edits
    (``metrics.phase_seconds``) and their total; nothing where no method's edits carry timings."""
    timings = {title: means for title, means in timings.items() if means}
    if not timings:
        return []
    phases = phase_order(timings.values())
    lines = ["", "## Where the time goes: mean seconds per edit, by phase", "",
             "| method | total | " + " | ".join(phases) + " |", "| --- | --- | " + " | ".join("---" for _ in phases) + " |"]
    for title, means in timings.items():
        lines.append(f"| {title} | {fmt(sum(means.values()))} | " + " | ".join(fmt(means.get(p)) for p in phases) + " |")
    return lines


def benchmark_markdown(method: str, metrics: Mapping[str, float]) -> list[str]:
    """The benchmark's table in its paper's columns (n/a: a metric no case gives), one row for ``method``."""
    columns = table_columns(metrics)
    if not columns:
        return []
    return ["", "## The benchmark's table (its paper's metrics; definitions in evaluations/README.md)", "",
            "| method | " + " | ".join(f"{title} (`{key}`)" for key, title in columns) + " |",
            "| --- | " + " | ".join("---" for _ in columns) + " |",
            f"| {method} | " + " | ".join(fmt(metrics.get(key)) for key, _ in columns) + " |"]  # fmt: skip


def fmt(value: float) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def summary_rows(metrics: dict[str, float]) -> list[tuple[str, str, str]]:
    return [(label, name, fmt(metrics[name])) for name, label in SUMMARY if name in metrics]


def per_relation(rows: list[dict]) -> dict[str, dict[str, float]]:
    """Per relation: edit success, generalization and interference retention, from the per-fact rows."""
    out: dict[str, dict[str, list[float]]] = {}
    for row in rows:
        rel = out.setdefault(row["relation"], {})
        for section, key in (("edit", "top1"), ("generalization", "top1")):
            if section in row:
                rel.setdefault(f"{section}/{key}", []).append(row[section][key])
        for section in RETENTION:
            if section in row:
                c = row[section]
                rel.setdefault(f"{section}/kept", []).append(c["kept"])
                rel.setdefault(f"{section}/correct_before", []).append(c["correct_before"])
    table: dict[str, dict[str, float]] = {}
    for relation, values in sorted(out.items()):
        entry = {k: sum(v) / len(v) for k, v in values.items() if k.endswith("top1")}
        for section in RETENTION:
            before = sum(values.get(f"{section}/correct_before", []))
            entry[f"{section}/retained"] = sum(values.get(f"{section}/kept", [])) / before if before else float("nan")
        entry["facts"] = float(sum(1 for r in rows if r["relation"] == relation))
        table[relation] = entry
    return table


def write_jsonl(path: Path, rows: list[dict]) -> None:
    with open(path, "w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")


def markdown(name: str, model: str, editor: str, metrics: dict, summary: dict, relations: dict, probe: dict,
             regressions: list, plots: list[str], config_yaml: str) -> str:  # fmt: skip
    lines = [f"# Evaluation `{name}`", "", f"- model: `{model}`", f"- editor: `{editor}`", f"- data: `{summary.get('data')}`",
             f"- facts: {summary.get('facts_loaded')} loaded, {summary.get('facts_checked')} checked, "
             f"{summary.get('facts_edited')} edited, {summary.get('facts_not_selected_limit')} not selected (limits)"]  # fmt: skip
    skipped = summary.get("skipped") or {}
    lines += ["- skipped: " + (", ".join(f"{n} × {reason}" for reason, n in skipped.items()) or "none"), ""]
    lines += ["## Summary", "", "| metric | key | value |", "| --- | --- | --- |"]
    lines += [f"| {label} | `{key}` | {value} |" for label, key, value in summary_rows(metrics)]
    lines += benchmark_markdown(editor, metrics)
    if regressions:
        lines += ["", "## Regressions against the baseline", ""] + [f"- {r}" for r in regressions]
    lines += ["", "## Per relation", "", "| relation | facts | edit top-1 | generalization top-1 | intra kept | inter kept |",
              "| --- | --- | --- | --- | --- | --- |"]  # fmt: skip
    for rel, v in relations.items():
        lines.append(f"| {rel} | {int(v['facts'])} | {fmt(v.get('edit/top1'))} | {fmt(v.get('generalization/top1'))} | "
                     f"{fmt(v.get('intra/retained'))} | {fmt(v.get('inter/retained'))} |")  # fmt: skip
    if probe:
        lines += ["", "## Suppress / amplify (ΔP/P of the correct answer, per relation)", "",
                  "| relation | suppress KN | suppress random | amplify KN | amplify random |", "| --- | --- | --- | --- | --- |"]  # fmt: skip
        for rel, v in probe.items():
            if any(not math.isnan(x) for x in v.values()):
                lines.append(f"| {rel} | {fmt(v['suppressed'])} | {fmt(v['control_suppressed'])} | {fmt(v['amplified'])} | "
                             f"{fmt(v['control_amplified'])} |")  # fmt: skip
    if plots:
        lines += ["", "## Plots", ""] + [f"![{p}]({p})" for p in plots]
    lines += ["", "## Configuration", "", "```yaml", config_yaml.rstrip(), "```", ""]
    return "\n".join(lines)


# (metric, column) of a sequential run's checkpoint table.
CURVE_COLUMNS = (
    ("edits/held", "edits still held"),
    ("edits/top1", "edit prompts top-1"),
    ("generalization/top1", "paraphrases top-1"),
    ("intra/retained", "same relation kept"),
    ("inter/retained", "other relations kept"),
    ("drift/change", "text ppl change"),
    ("fluency/entropy", "fluency"),
    ("edits/refused", "refused"),
)


def curve_markdown(curves: dict) -> str:
    """Sequential runs: one table per method, a row per checkpoint (number of edits made)."""
    lines = []
    for method, curve in curves.items():
        lines += [f"## Sequential edits: `{method}`", "", "| edits | " + " | ".join(t for _, t in CURVE_COLUMNS) + " |",
                  "| --- | " + " | ".join("---" for _ in CURVE_COLUMNS) + " |"]  # fmt: skip
        for point in curve:
            n, m = (point.n_edits, point.metrics) if hasattr(point, "n_edits") else (point["n_edits"], point)
            lines.append(f"| {n} | " + " | ".join(fmt(m.get(k)) for k, _ in CURVE_COLUMNS) + " |")
        lines.append("")
    return "\n".join(lines)


def progress_markdown(name: str, methods: dict[str, dict], config_text: str | None) -> str:
    """The report of what a sequential comparison's methods measured so far (``kept.kept_methods``' entries, also
    of stopped runs): a status table, then each method's checkpoint table, the curves figure and the config."""
    lines = [f"# Sequential comparison `{name}`: what each method measured", "",
             "| method | edits made | of | status | wall seconds |", "| --- | --- | --- | --- | --- |"]  # fmt: skip
    for method, m in methods.items():
        status = "finished" if m["finished"] else f"stopped after edit {m['edits_made']}"
        lines.append(f"| `{method}` | {m['edits_made']} | {m.get('edits_planned', m['edits_made'])} | {status} | "
                     f"{m.get('seconds', '–')} |")
    lines += ["", "Each table row is a checkpoint (edits made so far); a stopped method has no rows past the last "
              "checkpoint it reached. The edits are reverted at the end of a finished run (checked bit for bit); a "
              "stopped run's process ended with them.", ""]  # fmt: skip
    lines.append(curve_markdown({m: v["curve"] for m, v in methods.items()}))
    lines += ["![curves](curves.png)", ""]
    if config_text:
        lines += ["## Configuration", "", "```yaml", config_text.rstrip(), "```", ""]
    return "\n".join(lines)
