"""ROME's "Known 1000" facts (Meng et al. 2022): one prompt per fact, no paraphrases.

Records ``{known_id, subject, attribute, template, prediction, prompt, relation_id}``; ``prompt`` ends right
before ``attribute`` (the object). Masked LMs get ``prompt + " [Y]."``. Known 1000 has no held-out
paraphrases, so generalization is not measured on it (the run says so rather than reporting zeros).
"""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import DataError
from .download import data_cache, fetch
from .jsonl import require_str
from .records import FactRecord, FactSet

KNOWN1000_URL = "https://rome.baulab.info/data/dsets/known_1000.json"
FILE_NAME = "known_1000.json"


def load_known1000(
    path: str | Path | None = None, masked: bool = False, download: bool = True, url: str = KNOWN1000_URL
) -> FactSet:
    """Read Known 1000 from ``path`` (the JSON file or a folder holding ``known_1000.json``), or from the cache,
    downloading it there first when ``path`` is None and ``download`` is set."""
    if path is None:
        path = data_cache("known_1000") / FILE_NAME
        if not path.is_file():
            if not download:
                raise DataError("Known 1000 is not cached and downloading is off: give its file")
            try:
                fetch(url, path)
            except FileNotFoundError as exc:
                raise DataError(f"Known 1000 not found at {url}") from exc
    path = Path(path)
    if path.is_dir():
        path = path / FILE_NAME
    if not path.is_file():
        raise DataError(f"Known 1000 file not found: {path}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}:{exc.lineno}: not valid JSON ({exc.msg})") from exc
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a JSON list of fact records, got {type(data).__name__}")
    records = []
    for i, obj in enumerate(data):
        where = f"{path}: record {i}"
        if not isinstance(obj, dict):
            raise DataError(f"{where}: expected an object, got {type(obj).__name__}")
        prompt = require_str(obj, "prompt", where)
        subject = require_str(obj, "subject", where)
        relation = require_str(obj, "relation_id", where)
        attribute = require_str(obj, "attribute", where)
        if "[Y]" in prompt or "[MASK]" in prompt:
            raise DataError(f"{where}: prompt {prompt!r} already holds an answer slot")
        text = f"{prompt} [Y]." if masked else prompt
        records.append(FactRecord(f"known:{obj.get('known_id', i)}", subject, relation, attribute, (text,), ()))
    if not records:
        raise DataError(f"{path}: no facts in the file")
    return FactSet(name=f"known1000:{path}", records=records)
