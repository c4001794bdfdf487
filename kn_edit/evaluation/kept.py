"""What a comparison has measured so far, read from what it keeps on disk (no model, no computing): each finished
method's result under ``OUTPUT/.NAME.parts/METHOD.json`` and, in sequential mode, the checkpoints a method has
reached under ``METHOD.progress.json`` (rewritten after each checkpoint, so a stopped run keeps its curve); and the
report folder written from them (``compare --progress --report DIR``), which can join an earlier report's methods
(``--merge DIR``: runs made on another day, whose parts folder is gone)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable

from ..errors import DataError
from ..storage.atomic import atomic_dir
from ..storage.manifest import write_manifest
from .report import progress_markdown, write_jsonl


def kept_methods(parts: Path, titles: Iterable[str] | None = None) -> dict[str, dict]:
    """{file stem: {"curve", "rows", "edits_made", "edits_planned", "seconds", "finished"}} of a parts folder
    (``titles``: only these methods' files, named as the comparison names them). A finished part wins over its
    progress file; a single-edit part has an empty curve."""
    wanted = None if titles is None else set(titles)
    found: dict[str, dict] = {}
    for path in sorted(parts.glob("*.progress.json")):
        method = path.name[: -len(".progress.json")]
        if wanted is not None and method not in wanted:
            continue
        payload = json.loads(path.read_text())
        found[method] = {
            "curve": payload["curve"], "rows": payload["rows"], "edits_made": payload["edits_made"],
            "edits_planned": payload["edits_planned"], "seconds": payload["seconds"], "written": payload["written"],
            "finished": payload["edits_made"] >= payload["edits_planned"],
        }  # fmt: skip
    for path in sorted(parts.glob("*.json")):
        method = path.stem
        if path.name.endswith(".progress.json") or (wanted is not None and method not in wanted):
            continue
        payload = json.loads(path.read_text())
        curve = [{"n_edits": c["n_edits"], **c["metrics"]} for c in payload["curve"]]
        made = curve[-1]["n_edits"] if curve else len(payload["rows"])
        found[method] = {**found.get(method, {}), "curve": curve, "rows": payload["rows"], "finished": True,
                         "edits_made": made, "edits_planned": found.get(method, {}).get("edits_planned", made),
                         "seconds": payload["summary"].get("seconds", found.get(method, {}).get("seconds"))}  # fmt: skip
    return found


def comparison_progress(config) -> tuple[Path, dict[str, dict | None]]:
    """(the parts folder, {title: what ``kept_methods`` found for it, or None}) of each evaluation a
    CompareConfig runs (its methods, and in batch mode both ways of each)."""
    from .compare import parts_dir, ways

    parts = parts_dir(config)
    titles = {_safe(t): t for entry in config.methods for t, _ in ways(config, entry.title)}
    kept = kept_methods(parts, titles) if parts.is_dir() else {}
    return parts, {title: kept.get(stem) for stem, title in titles.items()}


def read_report(folder: Path) -> dict[str, dict]:
    """The methods of an earlier report folder (``write_report``'s), in the form of ``kept_methods``: its
    ``curves.json``, ``facts-METHOD.jsonl`` and the seconds and planned edits of its report.md's status table."""
    curves_path = folder / "curves.json"
    if not curves_path.is_file():
        raise DataError(f"{folder} holds no curves.json (not a report of `compare --progress --report`)")
    try:
        curves = json.loads(curves_path.read_text())
    except ValueError as exc:
        raise DataError(f"{curves_path} is not JSON: {exc}") from None
    seconds = _report_seconds(folder / "report.md")
    found: dict[str, dict] = {}
    for method, curve in curves.items():
        rows_path = folder / f"facts-{_safe(method)}.jsonl"
        if not rows_path.is_file():
            raise DataError(f"{rows_path} is missing (the report's per-edit rows of {method})")
        rows = [json.loads(line) for line in rows_path.read_text().splitlines() if line.strip()]
        made = curve[-1]["n_edits"] if curve else 0
        wall, planned = seconds.get(method, (None, made))
        found[method] = {"curve": curve, "rows": rows, "edits_made": made, "edits_planned": planned,
                         "seconds": wall, "finished": made >= planned}  # fmt: skip
    return found


def _report_seconds(report: Path) -> dict[str, tuple[float | None, int]]:
    """{method: (wall seconds, edits planned)} from the status table at the top of a report.md."""
    found: dict[str, tuple[float | None, int]] = {}
    if not report.is_file():
        return found
    for line in report.read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 5 and cells[0].startswith("`") and cells[2].isdigit():
            try:
                wall = float(cells[4])
            except ValueError:  # "None": a run that kept no seconds
                wall = None
            found[cells[0].strip("`")] = (wall, int(cells[2]))
    return found


def joined(kept: dict[str, dict], earlier: dict[str, dict]) -> dict[str, dict]:
    """An earlier report's methods (first, in its order) where ``kept`` has none of its own, then ``kept``'s."""
    return {**{m: v for m, v in earlier.items() if m not in kept}, **kept}


def write_report(target: Path, name: str, methods: dict[str, dict], config_text: str,
                 overwrite: bool = False, provenance: dict | None = None, **manifest) -> Path:
    """The report folder of a sequential comparison's kept methods, written atomically: ``curves.json``,
    ``curves.png``, ``facts-METHOD.jsonl``, ``report.md``, ``config.yaml`` (``config_text``) and
    ``manifest.json`` (``provenance``: ``start_manifest()``; ``manifest``: extra fields). ``overwrite``: replace a
    folder already there (the report that ``read_report`` read for a merge into the same folder)."""
    from .plots import curve_figure

    if not methods:
        raise DataError(f"no method of comparison {name!r} has kept any result yet (nothing to report)")
    curves = {m: v["curve"] for m, v in methods.items()}
    with atomic_dir(target, overwrite=overwrite, what="report") as tmp:
        (tmp / "curves.json").write_text(json.dumps(curves, indent=1, allow_nan=True))
        curve_figure(curves, tmp / "curves.png")
        for method, m in methods.items():
            write_jsonl(tmp / f"facts-{_safe(method)}.jsonl", m["rows"])
        (tmp / "report.md").write_text(progress_markdown(name, methods, config_text))
        (tmp / "config.yaml").write_text(config_text)
        write_manifest(tmp, provenance, config_text, kind="compare-progress", **manifest)
    return target


def _safe(title: str) -> str:
    """A method title as a file name (compare's ``_safe``: titles of batch ways hold a "/")."""
    from .compare import _safe as safe

    return safe(title)
