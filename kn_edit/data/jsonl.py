"""JSON Lines reading with errors that name the file and line, and the user fact-file format.

User fact files (``source: jsonl``), one JSON object a line; blank lines are ignored::

    {"subject": "France", "relation": "capital", "object": "Paris",
     "prompts": ["The capital of [X] is", "[X]'s capital city is"],
     "heldout_prompts": ["The capital city of [X] is"],          # optional: generalization prompts
     "id": "capital-france"}                                    # optional: defaults to FILE:LINE

For a batch edit (``kn-edit update-fact --facts FILE``) each line also has ``"new"``: the object the fact
should get. ``[X]`` in a prompt is replaced by the subject. A causal-LM prompt is the text before the answer (a trailing
``[Y]`` is cut); a masked-LM prompt holds ``[Y]`` or ``[MASK]`` where the answer goes. Every key except
``heldout_prompts`` and ``id`` is required; a malformed line is a DataError naming the file and line.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

from ..errors import DataError, PromptError
from ..models.prompts import SLOT_MARKERS, causal_prompt
from .records import FactRecord, FactSet


def read_jsonl(path: str | Path) -> Iterator[tuple[int, dict]]:
    """(line number, object) of each non-blank line; DataError (file:line) for text that is not a JSON object."""
    path = Path(path)
    if path.is_dir():
        raise DataError(f"{path} is a folder; give a JSON Lines file (one fact a line)")
    if not path.is_file():
        raise DataError(f"no such file: {path}")
    with open(path, "rb") as handle:
        for number, raw in enumerate(handle, start=1):
            try:
                line = raw.decode("utf-8-sig" if number == 1 else "utf-8")
            except UnicodeDecodeError as exc:
                raise DataError(f"{path}:{number}: not UTF-8 text (byte {raw[exc.start]:#04x} at offset "
                                f"{exc.start}); save the file as UTF-8") from exc
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}:{number}: not valid JSON ({exc.msg})") from exc
            if not isinstance(obj, dict):
                raise DataError(f"{path}:{number}: expected a JSON object, got {type(obj).__name__}")
            yield number, obj


def require_str(obj: dict, key: str, where: str) -> str:
    value = obj.get(key)
    if not isinstance(value, str) or not value.strip():
        raise DataError(f"{where}: {key!r} must be a non-empty string, got {value!r}")
    return value.strip()


def fill_prompt(pattern: str, subject: str, masked: bool, where: str) -> str:
    """A pattern with ``[X]`` filled in, in the model family's prompt convention (see the module docstring)."""
    text = pattern.replace("[X]", subject)
    if masked:
        if sum(text.count(m) for m in SLOT_MARKERS) != 1:
            raise DataError(f"{where}: masked-LM prompt {text!r} needs exactly one [Y] or [MASK] slot")
        return text
    try:
        return causal_prompt(text).rstrip()
    except PromptError as exc:
        raise DataError(f"{where}: {exc}") from exc


def _prompt_list(obj: dict, key: str, where: str, required: bool) -> list[str]:
    value = obj.get(key, [] if not required else None)
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(p, str) and p.strip() for p in value):
        raise DataError(f"{where}: {key!r} must be a list of non-empty strings, got {value!r}")
    if required and not value:
        raise DataError(f"{where}: {key!r} is empty; give at least one prompt")
    return value


def _fact_record(obj: dict, path: Path, number: int, masked: bool) -> FactRecord:
    where = f"{path}:{number}"
    subject = require_str(obj, "subject", where)
    relation = require_str(obj, "relation", where)
    obj_label = require_str(obj, "object", where)
    prompts = [fill_prompt(p, subject, masked, where) for p in _prompt_list(obj, "prompts", where, True)]
    heldout = [fill_prompt(p, subject, masked, where) for p in _prompt_list(obj, "heldout_prompts", where, False)]
    fact_id = obj.get("id", f"{path.name}:{number}")
    return FactRecord(str(fact_id), subject, relation, obj_label, tuple(dict.fromkeys(prompts)), tuple(dict.fromkeys(heldout)))


def load_jsonl_facts(path: str | Path, masked: bool = False) -> FactSet:
    """Read a user's fact file (format in the module docstring)."""
    path = Path(path)
    records = [_fact_record(obj, path, number, masked) for number, obj in read_jsonl(path)]
    ids = [r.fact_id for r in records]
    if len(set(ids)) != len(ids):
        dup = next(i for i in ids if ids.count(i) > 1)
        raise DataError(f"{path}: fact id {dup!r} appears more than once")
    if not records:
        raise DataError(f"{path}: no facts in the file")
    return FactSet(name=path.name, records=records)


def load_edit_requests(path: str | Path, masked: bool = False, erase: bool = False) -> list:
    """Edit requests from a fact file whose lines also carry ``"new"`` (the object each fact should get); with
    ``erase``, no ``new`` (each fact's object is erased). A fact (subject and relation) given twice with different
    new objects is a DataError naming both lines; exact repeats are kept once."""
    from .records import EditRequest

    path = Path(path)
    requests, first = [], {}
    for number, obj in read_jsonl(path):
        where = f"{path}:{number}"
        record = _fact_record(obj, path, number, masked)
        if erase:
            if "new" in obj:
                raise DataError(f"{where}: 'new' is given, but erasing takes the facts' objects away (drop 'new')")
            new = None
        else:
            new = require_str(obj, "new", where)
            if new == record.object:
                raise DataError(f"{where}: 'new' equals 'object' ({new!r}): nothing to edit")
        key = (record.subject, record.relation)
        if key in first:
            seen_line, seen_new = first[key]
            if seen_new != new:
                raise DataError(f"{where}: {record.subject!r} ({record.relation}) is already edited to {seen_new!r} on line "
                                f"{seen_line}; one batch cannot give a fact two new objects")
            continue
        first[key] = (number, new)
        requests.append(EditRequest(record.prompts, record.object, new, subject=record.subject, relation=record.relation))
    if not requests:
        raise DataError(f"{path}: no facts in the file")
    return requests
