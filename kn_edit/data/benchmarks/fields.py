"""What every benchmark reader shares: reading a file's records, and checking one field at a time.

A file is a JSON list of records (``.json``, or any other suffix) or JSON Lines (``.jsonl``: one record a line,
blank lines ignored). A record is named ``FILE:record I`` (I counts from 0, as the list's index) or ``FILE:line N``
(JSON Lines); every error names it and the field (dotted: ``requested_rewrite.target_new.str``), in one line.

Prompts are causal (the text before the answer): where one ends with an answer slot (``[Y]`` or ``[MASK]``, maybe
followed by punctuation) the slot is cut, as everywhere in kn-edit; a slot before other text is an error.
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

from ...errors import DataError, EditError, PromptError
from ...models.prompts import causal_prompt
from ..jsonl import read_jsonl
from ..records import BenchmarkCase, SkippedFact


class CaseList(list):
    """The cases of one file (a plain list of BenchmarkCase), plus the records set aside and why."""

    def __init__(self, cases=(), skipped: list[SkippedFact] | None = None) -> None:
        super().__init__(cases)
        self.skipped: list[SkippedFact] = list(skipped or [])


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def read_records(path: str | Path) -> list[tuple[str, dict]]:
    """[(where, record)] of a benchmark file (layout in the module docstring); DataError for a missing file, a
    folder, an empty file, text that is not JSON, or a JSON value that is not a list of objects."""
    path = Path(path)
    if path.is_dir():
        raise DataError(f"{path} is a folder; give the benchmark's .json or .jsonl file")
    if not path.is_file():
        raise DataError(f"no such file: {path}")
    if path.suffix.lower() == ".jsonl":
        records = [(f"{path}:line {number}", obj) for number, obj in read_jsonl(path)]
    else:
        try:
            text = path.read_bytes().decode("utf-8-sig")
        except UnicodeDecodeError as exc:
            raise DataError(f"{path}: not UTF-8 text (byte offset {exc.start}); save the file as UTF-8") from exc
        if not text.strip():
            raise DataError(f"{path} is empty")
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}: not valid JSON at line {exc.lineno} ({exc.msg})") from exc
        if not isinstance(data, list):
            hint = "; a file of one record a line must end in .jsonl" if isinstance(data, dict) else ""
            raise DataError(f"{path}: expected a JSON list of records, got {type(data).__name__}{hint}")
        records = []
        for index, obj in enumerate(data):
            if not isinstance(obj, dict):
                raise DataError(f"{path}:record {index}: expected an object, got {type(obj).__name__} {_show(obj)}")
            records.append((f"{path}:record {index}", obj))
    if not records:
        raise DataError(f"{path}: no records in the file")
    return records


def _cut(value: str, where: str, name: str) -> str:
    try:
        return causal_prompt(value).rstrip()
    except PromptError as exc:
        raise DataError(f"{where}: {name!r}: {exc}") from None


def text(obj: dict, key: str, where: str, name: str | None = None, required: bool = True,
         prompt: bool = False) -> str | None:
    """``obj[key]`` as a non-empty string (stripped; ``prompt``: its answer slot cut); None where it is absent (or
    null) and not ``required``."""
    name = name or key
    value = obj.get(key)
    if value is None:
        if required:
            raise DataError(f"{where}: missing field {name!r}")
        return None
    if not isinstance(value, str):
        raise DataError(f"{where}: {name!r} must be a string, got {type(value).__name__} {_show(value)}")
    if not value.strip():
        raise DataError(f"{where}: {name!r} is empty")
    return _cut(value.strip(), where, name) if prompt else value.strip()


def texts(obj: dict, key: str, where: str, name: str | None = None, required: bool = True,
          one_ok: bool = False, prompt: bool = False) -> tuple[str, ...]:
    """``obj[key]`` as a list of non-empty strings (stripped; ``prompt``: their answer slots cut); ``one_ok``: a
    lone string is a list of one. Absent (or null) and not ``required``: ()."""
    name = name or key
    value = obj.get(key)
    if value is None:
        if required:
            raise DataError(f"{where}: missing field {name!r}")
        return ()
    if one_ok and isinstance(value, str):
        value = [value]
    if not isinstance(value, list):
        raise DataError(f"{where}: {name!r} must be a list of strings, got {type(value).__name__} {_show(value)}")
    for j, item in enumerate(value):
        if not isinstance(item, str) or not item.strip():
            raise DataError(f"{where}: '{name}[{j}]' must be a non-empty string, got {_show(item)}")
    return tuple(_cut(item.strip(), where, f"{name}[{j}]") if prompt else item.strip() for j, item in enumerate(value))


def answers(obj: dict, key: str, where: str, name: str | None = None, required: bool = True) -> tuple[str, ...]:
    """An answer and its aliases, first the answer: a string, a list of strings, or a list of such lists (KnowEdit's
    ``ground_truth``); repeats dropped. Absent and not ``required``: ()."""
    name = name or key
    value = obj.get(key)
    if value is None and not required:
        return ()
    if not isinstance(value, list):
        return (text(obj, key, where, name),)
    flat: list[str] = []
    for j, group in enumerate(value):
        flat += texts({key: group}, key, where, f"{name}[{j}]", one_ok=True)
    if not flat:
        raise DataError(f"{where}: {name!r} is empty")
    return tuple(dict.fromkeys(flat))


def section(obj: dict, key: str, where: str, name: str | None = None, required: bool = True) -> dict:
    """``obj[key]`` as a JSON object; {} where it is absent and not ``required``."""
    name = name or key
    value = obj.get(key)
    if value is None and not required:
        return {}
    if value is None:
        raise DataError(f"{where}: missing field {name!r}")
    if not isinstance(value, dict):
        raise DataError(f"{where}: {name!r} must be an object, got {type(value).__name__} {_show(value)}")
    return value


def with_subject(pattern: str, subject: str, where: str, name: str) -> str:
    """A prompt pattern with its one ``{}`` filled by the subject."""
    if pattern.count("{}") != 1:
        raise DataError(f"{where}: {name} {_show(pattern)} needs one '{{}}' where the subject goes")
    return pattern.replace("{}", subject)


def case_id(obj: dict, index: int, where: str) -> str:
    """The record's ``case_id`` (a number or a string) where it has one, else its position in the file."""
    value = obj.get("case_id", index)
    if isinstance(value, bool) or not isinstance(value, (int, str)) or (isinstance(value, str) and not value.strip()):
        raise DataError(f"{where}: 'case_id' must be a number or a non-empty string, got {_show(value)}")
    return str(value).strip()


@contextmanager
def checked(where: str) -> Iterator[None]:
    """The record's own where in front of what EditRequest / Probe refuse (old equals new, an unknown kind)."""
    try:
        yield
    except EditError as exc:
        raise DataError(f"{where}: {exc}") from None


def guess_source(obj: dict) -> str | None:
    """Which benchmark a record's keys say it comes from, or None: a file read as the wrong one fails with that."""
    rewrite = obj.get("requested_rewrite")
    if isinstance(rewrite, list):
        return "mquake"
    if isinstance(rewrite, dict):
        return "counterfact"
    if "src" in obj and "alt" in obj:
        return "zsre"
    if "prompt" in obj and "target_new" in obj:
        return "knowedit"
    return None


Parse = Callable[[dict, str, int], "BenchmarkCase | SkippedFact"]


def read_cases(path: str | Path, source: str, parse: Parse) -> CaseList:
    """Every record of the file through ``parse(record, where, index)``; records it sets aside are counted in
    ``skipped``. Case ids must be unique."""
    cases = CaseList()
    seen: dict[str, str] = {}
    for index, (where, obj) in enumerate(read_records(path)):
        if index == 0:
            guess = guess_source(obj)
            if guess is not None and guess != source:
                raise DataError(f"{where}: this looks like a {guess} record (keys {', '.join(list(obj)[:6])}), "
                                f"not {source}; read it as source {guess}")
        result = parse(obj, where, index)
        if isinstance(result, SkippedFact):
            cases.skipped.append(result)
            continue
        if result.case_id in seen:
            raise DataError(f"{where}: case_id {result.case_id!r} is also the id of {seen[result.case_id]}")
        seen[result.case_id] = where
        cases.append(result)
    if not cases:
        raise DataError(f"{path}: no usable records ({len(cases.skipped)} set aside: "
                        f"{cases.skipped[0].reason if cases.skipped else 'none'})")
    return cases
