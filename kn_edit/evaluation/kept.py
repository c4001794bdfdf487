"""What a comparison has measured so far, read from what it keeps on disk (no model, no computing): each finished
method's result under ``OUTPUT/.NAME.parts/METHOD.json`` and, in sequential mode, the checkpoints a method has
reached under ``METHOD.progress.json`` (rewritten after each checkpoint, so a stopped run keeps its curve)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable


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
    from .compare import _safe, parts_dir, ways

    parts = parts_dir(config)
    titles = {_safe(t): t for entry in config.methods for t, _ in ways(config, entry.title)}
    kept = kept_methods(parts, titles) if parts.is_dir() else {}
    return parts, {title: kept.get(stem) for stem, title in titles.items()}
