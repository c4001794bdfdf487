"""Text to scan: the Wikipedia extracts (all of them, or the first n by title), a UTF-8 text file (paragraphs
separated by blank lines) or a JSONL file (one ``{"text": ...}`` per line), optionally split into sentences.

Reading is lazy where the source allows: a text file is read a chunk at a time (a paragraph, even one line of
many megabytes, is never held whole) and split into sentences as it streams, and JSONL files line by line, so a
scan's memory does not grow with the corpus. With ``max_chars`` each text is cut to its first characters; a scan
that reads only a text's first tokens loses nothing by it (kn_edit.models.prompts.head_chars gives the bound; only where
one token stands for more characters, a WordPiece unknown word or run of spaces longer than the cut, is a text
that would have fit cut short).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Iterable, Iterator

from ..data.jsonl import read_jsonl
from ..errors import DataError
from ..models.prompts import normalize

# A sentence ends at . ! or ? followed by whitespace and an upper-case letter, digit or quote; good enough for
# encyclopaedic text, and deterministic.
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[\"'(\[A-Z0-9])")
_SPACE = re.compile(r"\s+")  # \s is exactly str.isspace, so this collapses as " ".join(text.split()) does
_CHUNK = 1 << 16  # characters read from a text file at a time


def split_sentences(text: str) -> list[str]:
    return list(_texts([text, None], sentences=True))


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


def _file_pieces(path: Path, keep: int | None = None) -> Iterator[str | None]:
    """A text file's paragraphs as a stream of pieces, None after each paragraph: each line stripped, the lines
    of a paragraph (up to a blank line) joined by one space. Read _CHUNK characters at a time, so no line is held
    whole. ``keep``: the texts are cut at this many characters, so a run of spaces held inside a line (dropped if
    the line ends there) is kept to that length: whatever follows it lies beyond the cut."""
    try:
        with open(path, encoding="utf-8", errors="strict") as handle:
            paragraph = False  # a paragraph is open
            while part := handle.readline(_CHUNK):
                seen, held = False, ""  # the line has shown text; the spaces after its last text so far
                while True:
                    end = part.endswith("\n")
                    body = part[:-1] if end else part
                    body = body if seen else body.lstrip()
                    text = body.rstrip()
                    if text:
                        if not seen and paragraph:
                            yield " "
                        seen = paragraph = True
                        yield held + text
                        held = body[len(text):]
                    else:
                        held += body
                    held = held if keep is None else held[:keep]
                    if end or not (part := handle.readline(_CHUNK)):
                        break
                if not seen and paragraph:  # a blank line ends the paragraph
                    paragraph = False
                    yield None
            if paragraph:
                yield None
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None


def _jsonl_texts(path: Path) -> Iterator[str]:
    for number, row in read_jsonl(path):  # lazily, with file:line errors for bad JSON or bytes
        if not isinstance(row.get("text"), str):
            raise DataError(f"{path}:{number}: expected an object with a \"text\" string")
        if row["text"].strip():
            yield normalize(row["text"])


def _units(texts: Iterable[str]) -> Iterator[str | None]:
    """Whole texts as a stream of paragraph pieces (each text in pieces of _CHUNK characters, then None)."""
    for text in texts:
        yield from (text[start : start + _CHUNK] for start in range(0, len(text), _CHUNK))
        yield None


def _first(pieces: Iterable[str | None], limit: int | None) -> Iterator[str | None]:
    """The pieces of the first ``limit`` paragraphs (all with None)."""
    count = 0
    for piece in pieces:
        if limit is not None and count >= limit:
            return
        yield piece
        count += piece is None


def _file_stream(path: str | Path, max_chars: int | None) -> Iterator[str | None]:
    path = Path(path)
    if not path.is_file():
        raise DataError(f"corpus file not found: {path}")
    return _units(_jsonl_texts(path)) if path.suffix == ".jsonl" else _file_pieces(path, max_chars)


def _texts(pieces: Iterable[str | None], sentences: bool, max_chars: int | None = None) -> Iterator[str]:
    """The texts of a stream of paragraph pieces (None ends a paragraph): each paragraph, or each of its
    sentences (whitespace collapsed), cut to its first ``max_chars`` characters. Holds at most about max_chars
    characters and one piece (without max_chars: one text)."""
    if not sentences:
        parts: list[str] = []
        size = 0
        for piece in pieces:
            if piece is None:
                if parts:
                    yield "".join(parts)
                parts, size = [], 0
            elif max_chars is None or size < max_chars:
                piece = piece if max_chars is None else piece[: max_chars - size]
                parts.append(piece)
                size += len(piece)
        return
    # Sentences as the text streams: ``pending`` holds the current sentence from its start, or once it has run
    # over max_chars (its first max_chars kept in ``head``) only its last two characters, which a sentence end
    # needs (the character before the space, the space); ``scan``: where a sentence end may still start.
    pending, head, scan = "", None, 0

    def cut(sentence: str) -> str:
        return head if head is not None else sentence.strip()[:max_chars]

    for piece in pieces:
        if piece is None:
            if text := cut(pending):
                yield text
            pending, head, scan = "", None, 0
            continue
        piece = _SPACE.sub(" ", piece)  # (a piece is at most a chunk)
        if pending.endswith(" ") or (not pending and head is None):
            piece = piece.lstrip()
        pending += piece
        start = 0
        for match in _SENTENCE_END.finditer(pending, scan):
            if text := cut(pending[start : match.start()]):
                yield text
            head, start = None, match.end()
        pending = pending[start:]
        if max_chars is not None and len(pending) > max_chars:
            head = head if head is not None else pending[:max_chars]
            pending = pending[-2:]
        scan = max(0, len(pending) - 1)


def file_texts(path: str | Path, max_chars: int | None = None) -> Iterator[str]:
    """Texts of a file, lazily: JSONL (``.jsonl``: field ``text`` of each line) or paragraphs of plain text;
    each cut to its first ``max_chars`` characters if given."""
    return _texts(_file_stream(path, max_chars), sentences=False, max_chars=max_chars)


def corpus_texts(source: str, limit: int | None = None, sentences: bool = True,
                 max_chars: int | None = None) -> Iterator[str]:
    """Texts of ``source`` ("wiki" or a file path), each split into sentences if asked and cut to its first
    ``max_chars`` characters if given; the first ``limit`` extracts / paragraphs / lines. Raises DataError for an
    empty corpus (once the source is exhausted)."""
    if source == "wiki":
        pieces = _units(wiki_extracts(limit))
    else:
        pieces = _first(_file_stream(source, max_chars), limit)
    count = 0
    for text in _texts(pieces, sentences, max_chars):
        count += 1
        yield text
    if count == 0:
        raise DataError(f"corpus {source}: no text")
