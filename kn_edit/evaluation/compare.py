"""Comparing editing methods: every method of a CompareConfig runs through the same Lightning evaluation on the
same edit requests (one model, one fact set, one text sample), and one report puts them side by side:
markdown + JSON + a comparison plot, per-relation breakdowns, the settings used, and the baseline gate."""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

from ..storage.config import to_yaml
from ..data.records import BenchmarkCase, FactSet
from ..editing.registry import make_editor
from ..storage.atomic import atomic_dir
from ..storage.manifest import start_manifest, write_manifest
from ..progress import NullReporter, Reporter
from .config import CompareConfig, EditorConfig, EvalConfig, Mode, RegressionConfig, RunConfig
from .benchmark_metrics import table_columns
from .metrics import phase_seconds, row_metrics
from .module import PROBE_CONDITIONS
from .regression import Regression, compare as compare_metrics, load_metrics
from .report import curve_markdown, fmt, per_relation, timing_markdown
from .runner import EvalResult, check_new_outputs, evaluate, load_passages, run_dir_for
from .sequential import Checkpoint

if TYPE_CHECKING:
    from ..models.model import KnModel

log = logging.getLogger(__name__)

# (metric, column title) of the comparison table, in display order.
COLUMNS = (
    ("edit/top1", "edit top-1"),
    ("generalization/top1", "paraphrase top-1"),
    ("generalization/new_beats_old", "paraphrase P(new)>P(old)"),
    ("generalization/top1_subject_first", "paraphrase top-1, subject first"),
    ("intra_same/retained", "same relation, same object kept"),
    ("intra_other/retained", "same relation, other object kept"),
    ("inter/retained", "other relations kept"),
    ("drift/mean_change", "text ppl change (mean)"),
    ("drift/max_change", "text ppl change (max)"),
    ("fluency/entropy_after", "fluency after"),
    ("edit/seconds", "s / edit"),
    ("run/peak_memory_mb", "peak MB"),
    ("run/edit_errors", "refused"),
)


@dataclass
class CompareResult:
    results: dict[str, EvalResult]  # method title → its evaluation
    config: CompareConfig
    regressions: list[Regression] = field(default_factory=list)
    run_dir: Path | None = None
    reused: list[str] = field(default_factory=list)  # titles whose kept result (resume=true) was reused

    def flat_metrics(self) -> dict[str, float]:
        """``title:metric`` → value, the form baselines and tolerances use."""
        return {f"{title}:{k}": v for title, r in self.results.items() for k, v in r.metrics.items()}


def eval_config_for(config: CompareConfig, entry, mode: Mode | None = None) -> EvalConfig:
    """The evaluation settings of one method: everything the comparison shares, this method's editor (``mode``:
    one way of a batch comparison, see ``ways``)."""
    shared = {f: getattr(config, f) for f in RunConfig.__dataclass_fields__}
    if mode is not None:
        shared["mode"] = mode
    shared["regression"] = RegressionConfig()  # the comparison gates on its own baseline
    return EvalConfig(**shared, editor=EditorConfig(entry.method, dict(entry.settings)))


def ways(config: CompareConfig, title: str) -> list[tuple[str, Mode | None]]:
    """(title, mode) of each evaluation a method gets: mode=batch measures the N facts edited in one edit
    (``TITLE/batch``) beside the same facts edited one by one (``TITLE/single``), those of ``batch_ways``; other
    modes, one evaluation."""
    if config.mode == Mode.batch:
        both = [(f"{title}/batch", Mode.batch), (f"{title}/single", Mode.single)]
        return [(t, m) for t, m in both if m.value in config.batch_ways]
    return [(title, None)]


def compare_methods(config: CompareConfig, km: KnModel | None = None, facts: FactSet | None = None,
                    passages: Sequence[str] | None = None, reporter: Reporter | None = None,
                    write: bool = True, cases: Sequence[BenchmarkCase] | None = None) -> CompareResult:
    """Run every method of ``config`` on the same requests; write one report (``write``). ``cases``: benchmark
    records that replace reading ``data.path`` (data.source a benchmark)."""
    from ..models.loading import load
    from .datamodule import FactDataModule, process_rank_and_world

    config.check()
    reporter = reporter or NullReporter()
    target = run_dir_for(config) if write else None  # named once (without run_name it carries the start time)
    if target is not None:  # before the model is loaded: an existing run is never overwritten
        check_new_outputs(target)
    provenance = start_manifest()  # the code and command as the comparison starts (its manifest)
    km = km if km is not None else load(config.model, device="cpu", reporter=reporter)
    editors = [(entry.title, make_editor(entry.method, overrides=dict(entry.settings))) for entry in config.methods]
    passages = list(passages) if passages is not None else load_passages(config)
    # The known-fact check and the neighbour draw run once: every method gets the very same cases.
    datamodule = FactDataModule(km, config.data, facts=facts, benchmark=cases)
    datamodule.setup("test")
    parts = parts_dir(config)
    before: dict = {}  # the unedited model's measurements, the same for every method (all settings are shared)
    results: dict[str, EvalResult] = {}
    shared = inputs_digest(km.name, datamodule.cases, passages)  # what every method's key has in common
    reused: list[str] = []
    for (method_title, editor), entry in zip(editors, config.methods):
        for title, mode in ways(config, method_title):
            key = part_key(config, entry, editor, shared, mode)
            done, note = None, ""
            if config.resume:
                try:
                    done = load_part(parts / f"{_safe(title)}.json", key)
                except UnusablePart as exc:
                    log.warning("method %s: not reusing the kept result %s: %s; evaluating it again", title, exc.path, exc)
                    note = f": not reusing its kept result ({exc}), evaluating it again"
            if done is not None:
                with reporter.task(f"method {title}: finished evaluation reused from {parts}", total=1) as task:
                    task.advance()
                results[title] = done
                reused.append(title)
                continue
            with reporter.task(f"method {title}{note}", total=None):
                progress = parts / f"{_safe(title)}.progress.json" if write else None  # sequential: the curve so far
                results[title] = evaluate(eval_config_for(config, entry, mode), km=km, editor=editor, passages=passages,
                                          reporter=reporter, write=False, datamodule=datamodule,
                                          before_cache=before, progress_path=progress)  # fmt: skip
            # Under DDP (trainer.devices > 1) every process runs this loop (each evaluation ends with every
            # process's rows); process 0 alone, known only once the first evaluation started the processes, writes.
            if write and process_rank_and_world()[0] == 0:  # an interrupted comparison resumes from here (resume=true)
                save_part(parts / f"{_safe(title)}.json", key, results[title])
    result = CompareResult(results, config, reused=reused)
    if config.regression.baseline:
        baseline = load_metrics(config.regression.baseline)
        result.regressions = compare_metrics(result.flat_metrics(), baseline, config.regression.tolerances)
    if target is not None and process_rank_and_world()[0] == 0:
        result.run_dir = write_comparison(config, km, result, target, provenance)
    return result


def parts_dir(config: CompareConfig) -> Path:
    """Where each finished method's evaluation is kept: a stopped comparison resumes from them, and runs of the
    same comparison with different methods (e.g. in parallel) are joined by one ``resume=true`` run over all."""
    return Path(config.output_dir) / f".{_safe(config.name)}.parts"


def inputs_digest(model: str, cases, passages: Sequence[str]) -> str:
    """A digest of the model name, the edit cases and the text sample (the same for every method of a run)."""
    return _digest(model, repr(list(cases)), repr(list(passages)))


def part_key(config: CompareConfig, entry, editor, inputs: str, mode: Mode | None = None) -> str:
    """A finished method is reused only for the very same settings (the evaluation's and the editor's resolved
    ones, defaults included) and inputs (``inputs_digest``: model, edit cases and text sample)."""
    settings = eval_config_for(config, entry, mode)
    settings.run_name = None
    return _digest(inputs, to_yaml(settings), repr(getattr(editor, "settings", None)))


def _digest(*pieces: str) -> str:
    digest = hashlib.sha256()
    for piece in pieces:
        digest.update(piece.encode("utf-8"))
        digest.update(b"\0")
    return digest.hexdigest()


class UnusablePart(Exception):
    """A kept method result that cannot be trusted (unreadable, altered, malformed): it is evaluated again."""

    def __init__(self, path: Path, reason: str) -> None:
        super().__init__(reason)
        self.path = path


# The fields of a kept result besides its key and digest, and their JSON types.
_PART_FIELDS = {"metrics": dict, "rows": list, "summary": dict, "per_relation": dict, "probe_per_relation": dict,
                "curve": list}  # fmt: skip


def _content_digest(body: dict) -> str:
    return _digest(json.dumps(body, sort_keys=True, allow_nan=True))


def save_part(path: Path, key: str, result: EvalResult) -> None:
    from ..storage.atomic import atomic_file

    body = {"key": key, "metrics": result.metrics, "rows": result.rows, "summary": result.summary,
            "per_relation": result.per_relation, "probe_per_relation": result.probe_per_relation,
            "curve": [{"n_edits": c.n_edits, "metrics": c.metrics} for c in result.curve]}  # fmt: skip
    body = json.loads(json.dumps(body, allow_nan=True))  # the digest is of what will be read back
    with atomic_file(path, overwrite=True, what="method result") as tmp:
        tmp.write_text(json.dumps(body | {"digest": _content_digest(body)}, allow_nan=True))


def load_part(path: Path, key: str) -> EvalResult | None:
    """The evaluation kept at ``path`` if it was made under ``key``; None when there is none or it was made under
    other settings. Raises UnusablePart (with the reason) for one that is unreadable, whose content does not
    match its digest, that lacks a field, or whose metrics do not follow from its per-fact rows."""
    if not path.exists():
        return None
    try:
        payload = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise UnusablePart(path, f"unreadable: {exc}") from None
    if not isinstance(payload, dict):
        raise UnusablePart(path, "not a JSON object")
    if payload.get("key") != key:
        return None
    body = {k: v for k, v in payload.items() if k != "digest"}
    if "digest" not in payload:
        raise UnusablePart(path, "it carries no digest of its content (kept by an older kn-edit, or altered)")
    if payload["digest"] != _content_digest(body):
        raise UnusablePart(path, "its content does not match its digest (changed since it was written)")
    for name, kind in _PART_FIELDS.items():
        if not isinstance(payload.get(name), kind):
            raise UnusablePart(path, f"its {name!r} is missing or not a JSON {kind.__name__}")
    try:
        curve = [Checkpoint(int(c["n_edits"]), dict(c["metrics"])) for c in payload["curve"]]
        result = EvalResult(payload["metrics"], payload["rows"], payload["summary"], payload["per_relation"],
                            payload["probe_per_relation"], curve=curve)  # fmt: skip
        problem = part_problem(result)
    except (KeyError, IndexError, TypeError, ValueError, AttributeError, ZeroDivisionError) as exc:
        raise UnusablePart(path, f"malformed ({type(exc).__name__}: {exc})") from None
    if problem:
        raise UnusablePart(path, problem)
    return result


def part_problem(result: EvalResult) -> str | None:
    """What in a kept evaluation disagrees with its per-fact rows (None: everything that follows from them
    agrees): a single-edit run's metrics (``metrics.row_metrics``), per-relation table and probe table; a
    sequential run's final metrics (its last checkpoint's), its number of rows and refused edits per checkpoint."""
    rows, metrics = result.rows, result.metrics
    if not all(isinstance(r, dict) for r in rows) or not all(_is_number(v) for v in metrics.values()):
        return "its rows or metrics are not what an evaluation writes"
    if result.curve:
        last = result.curve[-1]
        if len(rows) != last.n_edits:
            return f"it has {len(rows)} rows for {last.n_edits} edits"
        for point in result.curve:
            refused, counted = float(sum("error" in r for r in rows[: point.n_edits])), point.metrics.get("edits/refused")
            if not _close(counted, refused):
                return f"its checkpoint {point.n_edits} counts {counted} refused edits, its rows {refused}"
        expected, relations, probes = dict(last.metrics) | {"edits/n": float(last.n_edits)}, {}, {}
        if set(metrics) != set(expected):
            return "its metrics are not its last checkpoint's"
    else:
        expected, relations = row_metrics(rows), per_relation(rows)
        probes = {rel: _probe_means(rows, rel) for rel in result.probe_per_relation}
        if any("probe" in r and r["relation"] not in probes for r in rows):
            return "its probe table leaves out a probed relation"
        for condition in PROBE_CONDITIONS if "probe/facts" in metrics else ():
            finite = [v[condition] for v in probes.values() if not math.isnan(v[condition])]
            expected[f"probe/{condition}"] = sum(finite) / len(finite) if finite else float("nan")
    for key, value in expected.items():
        if key not in metrics or not _close(metrics[key], value):
            return f"its {key} is {metrics.get(key)}, its rows give {value}"
    if not _same(result.per_relation, relations):
        return "its per-relation table does not follow from its rows"
    if not _same(result.probe_per_relation, probes):
        return "its probe table does not follow from its rows"
    return None


def _probe_means(rows: list[dict], relation: str) -> dict[str, float]:
    """The mean probe change ratios of a relation's probed facts (NaN where none was probed)."""
    probed = [r["probe"] for r in rows if r["relation"] == relation and "probe" in r]
    return {c: sum(p[c] for p in probed) / len(probed) if probed else float("nan") for c in PROBE_CONDITIONS}


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _close(a, b) -> bool:
    """Equal up to the rounding of float32 sums (torchmetrics) and of the numbers rows keep; NaN equals NaN."""
    if not (_is_number(a) and _is_number(b)):
        return False
    if math.isnan(a) or math.isnan(b):
        return math.isnan(a) and math.isnan(b)
    return math.isclose(a, b, rel_tol=1e-5, abs_tol=1e-6)


def _same(a: dict, b: dict) -> bool:
    """Two tables of numbers (relation -> key -> number) agree (``_close``)."""
    if not (isinstance(a, dict) and a.keys() == b.keys()):
        return False
    return all(isinstance(a[k], dict) and a[k].keys() == b[k].keys() and all(_close(a[k][j], v) for j, v in b[k].items())
               for k in b)  # fmt: skip


def comparison_markdown(config: CompareConfig, model: str, result: CompareResult, plots: list[str]) -> str:
    first = next(iter(result.results.values()))
    s = first.summary
    # a benchmark's columns (its paper's) first, then kn-edit's own
    columns = table_columns({k: v for r in result.results.values() for k, v in r.metrics.items()}) + list(COLUMNS)
    lines = [f"# Comparison `{config.name}`", "", f"- model: `{model}`", f"- data: `{s.get('data')}`",
             f"- facts edited by every method: {s.get('facts_edited')} ({s.get('facts_checked')} checked)",
             f"- methods: {', '.join(f'`{t}`' for t in result.results)}", "",
             "## Every metric per method", "",
             "| method | " + " | ".join(title for _, title in columns) + " |",
             "| --- | " + " | ".join("---" for _ in columns) + " |"]  # fmt: skip
    for title, r in result.results.items():
        lines.append(f"| {title} | " + " | ".join(fmt(r.metrics.get(k)) for k, _ in columns) + " |")
    lines += timing_markdown({title: phase_seconds(r.rows) for title, r in result.results.items()})
    if result.regressions:
        lines += ["", "## Regressions against the baseline", ""] + [f"- {r}" for r in result.regressions]
    curves = {t: r.curve for t, r in result.results.items() if r.curve}
    if curves:
        lines += ["", curve_markdown(curves)]
    relations = sorted({rel for r in result.results.values() for rel in r.per_relation})
    for key, label in (("edit/top1", "edit top-1"), ("generalization/top1", "paraphrase top-1"),
                       ("intra/retained", "same relation kept"), ("inter/retained", "other relations kept")):  # fmt: skip
        lines += ["", f"## Per relation: {label}", "", "| relation | " + " | ".join(result.results) + " |",
                  "| --- | " + " | ".join("---" for _ in result.results) + " |"]  # fmt: skip
        for rel in relations:
            cells = [fmt(r.per_relation.get(rel, {}).get(key)) for r in result.results.values()]
            lines.append(f"| {rel} | " + " | ".join(cells) + " |")
    samples = [(t, row) for t, r in result.results.items() for row in r.rows if row.get("fluency", {}).get("samples")]
    if samples:
        lines += ["", "## Generations before and after an edit (greedy)", ""]
        for title, row in samples[: 2 * len(result.results)]:
            for sample in row["fluency"]["samples"][:1]:
                lines += [f"- `{title}`, {row['subject']!r}: {row['old']!r} → {row['new']!r}",
                          f"  - before: {sample['before']!r}", f"  - after: {sample['after']!r}"]
    if plots:
        lines += ["", "## Plots", ""] + [f"![{p}]({p})" for p in plots]
    lines += ["", "## Configuration", "", "```yaml", to_yaml(config).rstrip(), "```", ""]
    return "\n".join(lines)


def write_comparison(config: CompareConfig, km: KnModel, result: CompareResult, target: Path | None = None,
                     provenance: dict | None = None) -> Path:
    """The comparison's folder ``target`` (default ``run_dir_for(config)``), written atomically, with its
    ``manifest.json`` (``provenance``: ``start_manifest()`` of the comparison's start)."""
    from .plots import comparison_figure, curve_figure
    from .report import write_jsonl

    target = target or run_dir_for(config)
    with atomic_dir(target) as tmp:
        for title, r in result.results.items():
            write_jsonl(tmp / f"facts-{_safe(title)}.jsonl", r.rows)
        payload = {"methods": {t: r.metrics for t, r in result.results.items()},
                   "metrics": result.flat_metrics(),
                   "per_relation": {t: r.per_relation for t, r in result.results.items()},
                   "summary": {t: r.summary for t, r in result.results.items()},
                   "regressions": [str(r) for r in result.regressions], "written": time.strftime("%Y-%m-%d %H:%M:%S"),
                   "timings": {t: phase_seconds(r.rows) for t, r in result.results.items()}}  # fmt: skip
        (tmp / "metrics.json").write_text(json.dumps(payload, indent=2, sort_keys=True, allow_nan=True))
        config_yaml = to_yaml(config)
        (tmp / "config.yaml").write_text(config_yaml)
        write_manifest(tmp, provenance, config_yaml, km.device, kind="compare", model=km.name,
                       reused_parts=result.reused)  # those were computed by an earlier process
        plots = [comparison_figure({t: r.metrics for t, r in result.results.items()}, tmp / "methods.png").name] if config.plots else []
        curves = {t: [{"n_edits": c.n_edits, **c.metrics} for c in r.curve] for t, r in result.results.items() if r.curve}
        if curves:
            (tmp / "curves.json").write_text(json.dumps(curves, indent=2, allow_nan=True))
            if config.plots:
                plots.append(curve_figure(curves, tmp / "curves.png").name)
        (tmp / "report.md").write_text(comparison_markdown(config, km.name, result, plots))
    return target


def _safe(title: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in title)


__all__ = ["COLUMNS", "CompareResult", "compare_methods", "eval_config_for", "write_comparison"]
