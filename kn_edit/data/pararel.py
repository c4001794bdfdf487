"""ParaRel (Elazar et al. 2021), the Knowledge Neurons paper's data: paraphrase patterns × T-REx facts.

Layout (the public repository's, also what ``../shared/data/pararel`` holds)::

    patterns/P17.jsonl   {"pattern": "[X] is located in [Y] .", ...}      one relation a file
    facts/P17.jsonl      {"sub_label": "...", "obj_label": "...", "uuid": "..."}

A fact's *bag* is its relation's patterns with ``[X]`` filled by the subject. For causal LMs only patterns
that end with ``[Y]`` (optionally followed by punctuation) make prompts; the slot and what follows are cut.
Masked LMs use every pattern.

Held-out paraphrases (generalization): per relation, its usable patterns are shuffled with
``random.Random(f"{seed}:{relation}")`` and the first ``n_heldout = min(n - 1, max(1, round(fraction · n)))``
are held out for every fact of that relation (so generalization is measured on paraphrase *templates* never
used to locate or edit); a relation with a single usable pattern has no held-out prompts.

``heldout="subject_first"`` splits by wording instead: the patterns that begin with the subject (``[X] ...``)
are held out and the others (subject inside) are the edit prompts, so paraphrases that begin with the subject
are measured with none of them among the edit prompts (issue 30); a relation without both kinds has no fact
to measure this way and its facts are set aside.

Facts whose relation has no pattern file, or no usable pattern, are not dropped silently: they are listed
in ``FactSet.skipped`` with the reason.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Sequence

from ..errors import DataError, PromptError
from ..models.prompts import causal_prompt
from .download import data_cache, fetch
from .jsonl import read_jsonl, require_str
from .records import FactRecord, FactSet, SkippedFact

PARAREL_URL = "https://raw.githubusercontent.com/yanaiela/pararel/main/data"
# The relations of ParaRel's T-REx fact files (data/trex_lms_vocab/); P31 and P527 have no patterns.
PARAREL_RELATIONS = (
    "P1001", "P101", "P103", "P106", "P108", "P127", "P1303", "P131", "P136", "P1376", "P138", "P140", "P1412",
    "P159", "P17", "P176", "P178", "P19", "P190", "P20", "P264", "P27", "P276", "P279", "P30", "P31", "P36",
    "P361", "P364", "P37", "P39", "P407", "P413", "P449", "P463", "P47", "P495", "P527", "P530", "P740", "P937",
)  # fmt: skip
_COMPLETE = "kn_edit_complete.json"


def download_pararel(dest: Path | None = None, base_url: str = PARAREL_URL) -> Path:
    """Fetch the pattern and fact files into ``dest`` (default: the kn-edit cache) once; return the folder."""
    dest = Path(dest) if dest is not None else data_cache("pararel")
    if (dest / _COMPLETE).is_file():
        return dest
    missing = []
    for relation in PARAREL_RELATIONS:
        fetch(f"{base_url}/trex_lms_vocab/{relation}.jsonl", dest / "facts" / f"{relation}.jsonl")
        try:
            fetch(f"{base_url}/pattern_data/graphs_json/{relation}.jsonl", dest / "patterns" / f"{relation}.jsonl")
        except FileNotFoundError:
            missing.append(relation)  # kept: its facts are then reported as skipped, not lost
    (dest / _COMPLETE).write_text(json.dumps({"source": base_url, "relations_without_patterns": missing}))
    return dest


def _usable_patterns(path: Path, masked: bool) -> list[str]:
    patterns = []
    for number, obj in read_jsonl(path):
        pattern = require_str(obj, "pattern", f"{path}:{number}")
        if "[X]" not in pattern or "[Y]" not in pattern:
            raise DataError(f"{path}:{number}: pattern {pattern!r} needs both [X] and [Y]")
        if masked:
            patterns.append(pattern)
            continue
        try:
            patterns.append(causal_prompt(pattern).rstrip())
        except PromptError:
            continue  # [Y] before other text: no next-token prompt (counted via the relation if none is left)
    return list(dict.fromkeys(patterns))


HELDOUT_SPLITS = ("random", "subject_first")


def split_patterns(patterns: Sequence[str], relation: str, fraction: float, seed: int,
                   heldout: str = "random") -> tuple[list[str], list[str]]:
    """(edit patterns, held-out patterns) of a relation; the rules are in the module docstring."""
    if heldout not in HELDOUT_SPLITS:
        raise DataError(f"heldout must be one of {', '.join(HELDOUT_SPLITS)}, got {heldout!r}")
    if heldout == "subject_first":
        first = [p for p in patterns if p.lstrip().startswith("[X]")]
        return [p for p in patterns if p not in first], first
    if not 0.0 <= fraction < 1.0:
        raise DataError(f"heldout_fraction must be in [0, 1), got {fraction}")
    order = list(patterns)
    random.Random(f"{seed}:{relation}").shuffle(order)
    n = len(order)
    n_heldout = 0 if n < 2 or fraction == 0 else min(n - 1, max(1, round(fraction * n)))
    return order[n_heldout:], order[:n_heldout]


def load_pararel(
    root: str | Path | None = None,
    masked: bool = False,
    relations: Sequence[str] | None = None,
    heldout_fraction: float = 0.3,
    seed: int = 0,
    max_prompts: int | None = None,
    download: bool = True,
    heldout: str = "random",
) -> FactSet:
    """Read ParaRel from ``root`` (a folder with ``patterns/`` and ``facts/``), or from the cache, downloading it
    there first when ``root`` is None and ``download`` is set. ``max_prompts`` caps the edit prompts per fact;
    ``heldout``: how held-out paraphrases are chosen (``random`` or ``subject_first``, module docstring)."""
    if root is None:
        if not download and not (data_cache("pararel") / _COMPLETE).is_file():
            raise DataError("ParaRel is not cached and downloading is off: give its folder")
        root = download_pararel()
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"ParaRel folder not found: {root}")
    facts_dir, patterns_dir = root / "facts", root / "patterns"
    if not facts_dir.is_dir():
        raise DataError(f"{root} is not a ParaRel folder: it has no facts/ subfolder")
    available = sorted(p.stem for p in facts_dir.glob("*.jsonl"))
    if relations:
        unknown = sorted(set(relations) - set(available))
        if unknown:
            raise DataError(f"relations {unknown} have no fact file in {facts_dir}; available: {', '.join(available)}")
        available = [r for r in available if r in set(relations)]
    records: list[FactRecord] = []
    skipped: list[SkippedFact] = []
    for relation in available:
        facts_file = facts_dir / f"{relation}.jsonl"
        pattern_file = patterns_dir / f"{relation}.jsonl"
        facts = [(n, require_str(o, "sub_label", f"{facts_file}:{n}"), require_str(o, "obj_label", f"{facts_file}:{n}"), o.get("uuid"))
                 for n, o in read_jsonl(facts_file)]  # fmt: skip
        patterns = _usable_patterns(pattern_file, masked) if pattern_file.is_file() else None
        if not patterns:
            reason = "relation has no pattern file" if patterns is None else "relation has no usable pattern"
            detail = "" if patterns is None else "no pattern ends with [Y] (causal LM)"
            skipped += [SkippedFact(f"{relation}:{uuid or n}", relation, reason, detail) for n, _, _, uuid in facts]
            continue
        edit_patterns, heldout_patterns = split_patterns(patterns, relation, heldout_fraction, seed, heldout)
        if heldout == "subject_first" and not (edit_patterns and heldout_patterns):
            detail = "no pattern begins with the subject" if not heldout_patterns else "every pattern begins with it"
            skipped += [SkippedFact(f"{relation}:{uuid or n}", relation, "relation has no subject-first split", detail)
                        for n, _, _, uuid in facts]  # fmt: skip
            continue
        if max_prompts is not None:
            edit_patterns = edit_patterns[:max_prompts]
        for n, subject, obj, uuid in facts:
            fill = lambda ps: tuple(dict.fromkeys(p.replace("[X]", subject) for p in ps))  # noqa: E731
            records.append(FactRecord(f"{relation}:{uuid or n}", subject, relation, obj, fill(edit_patterns), fill(heldout_patterns)))
    return FactSet(name=f"pararel:{root}", records=records, skipped=skipped)
