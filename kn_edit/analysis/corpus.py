"""Text to scan: the Wikipedia extracts (all of them, or the first n by title), a UTF-8 text file (paragraphs
separated by blank lines) or a JSONL file (one ``{"text": ...}`` per line), optionally split into sentences.

Reading is lazy where the source allows (text and JSONL files are read line by line), so a scan's memory does not
grow with the corpus.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Iterator

from ..data.jsonl import read_jsonl
from ..errors import DataError

# A sentence ends at . ! or ? followed by whitespace and an upper-case letter, digit or quote; good enough for
# encyclopaedic text, and deterministic.
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[\"'(\[A-Z0-9])")


def split_sentences(text: str) -> list[str]:
    return [s.strip() for s in _SENTENCE_END.split(" ".join(text.split())) if s.strip()]


def wiki_extracts(n: int | None = None, path: str | Path | None = None, download: bool = True) -> list[str]:
    """All Wikipedia extracts sorted by title (the first ``n`` if given). Unlike the perplexity text (a fixed
    held-out slice, every 10th title), analysis uses the whole corpus."""
    from ..data.text import wiki_summaries_path

    path = Path(path) if path is not None else wiki_summaries_path(download)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(f"{path}: cannot read the Wikipedia extracts ({exc})") from exc
    if not isinstance(data, dict):
        raise DataError(f"{path}: expected {{title: {{'extract': text, ...}}}}")
    texts = [" ".join(str(data[t].get("extract", "")).split()) for t in sorted(data) if isinstance(data[t], dict)]
    texts = [t for t in texts if t]
    if not texts:
        raise DataError(f"{path}: no extracts")
    if n is not None:
        if n < 1:
            raise DataError(f"asked for {n} extracts: give at least 1")
        texts = texts[:n]
    return texts


def _lines(path: Path) -> Iterator[str]:
    try:
        with open(path, encoding="utf-8", errors="strict") as handle:
            yield from handle
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None


def file_texts(path: str | Path) -> Iterator[str]:
    """Texts of a file, lazily: JSONL (``.jsonl``: field ``text`` of each line) or paragraphs of plain text."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"corpus file not found: {path}")
    if path.suffix == ".jsonl":
        for number, row in read_jsonl(path):  # lazily, with file:line errors for bad JSON or bytes
            if not isinstance(row.get("text"), str):
                raise DataError(f"{path}:{number}: expected an object with a \"text\" string")
            if row["text"].strip():
                yield " ".join(row["text"].split())
        return
    paragraph: list[str] = []
    for line in _lines(path):
        if line.strip():
            paragraph.append(line.strip())
        elif paragraph:
            yield " ".join(paragraph)
            paragraph = []
    if paragraph:
        yield " ".join(paragraph)


def corpus_texts(source: str, limit: int | None = None, sentences: bool = True) -> Iterator[str]:
    """Texts of ``source`` ("wiki" or a file path), each split into sentences if asked; the first ``limit``
    extracts / paragraphs / lines. Raises DataError for an empty corpus (once the source is exhausted)."""
    base = iter(wiki_extracts(limit)) if source == "wiki" else file_texts(source)
    count = 0
    for i, text in enumerate(base):
        if source != "wiki" and limit is not None and i >= limit:
            break
        for piece in (split_sentences(text) if sentences else [text]):
            count += 1
            yield piece
    if count == 0:
        raise DataError(f"corpus {source}: no text")
