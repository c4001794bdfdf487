"""MQuAKE (Zhong et al. 2023): edits whose consequences multi-hop questions must carry.

A record (MQuAKE-CF / MQuAKE-T; kn-edit's ``make-multihop`` writes the same layout)::

    {"case_id": 1, "requested_rewrite": [{"prompt": "{} is a citizen of", "subject": "Vince McMahon",
                                          "relation_id": "P27", "target_new": {"str": "Libya"},
                                          "target_true": {"str": "United States of America"}}, ...],
     "questions": ["What is the capital of the country ...?", ...],
     "answer": "Washington, D.C.", "answer_alias": [...], "new_answer": "Tripoli", "new_answer_alias": [...],
     "single_hops": [...], "new_single_hops": [...], "orig": {...}}

Read into one BenchmarkCase: one edit per requested rewrite (applied together), and one ``multihop`` probe of the
questions (used as they are: questions or cloze prompts) with answer ``new_answer`` (+ ``new_answer_alias``) and
``before`` ``answer`` (+ ``answer_alias``, and MQuAKE-T's ``answer_extended``). MQuAKE counts a case as answered
when any one of its questions is. ``single_hops``, ``new_single_hops`` and ``orig`` are not read.
"""

from __future__ import annotations

from pathlib import Path

from ...errors import DataError
from ..records import BenchmarkCase, EditRequest, Probe
from .fields import CaseList, case_id, checked, read_cases, section, text, texts, with_subject


def _request(rewrite: object, where: str, name: str) -> EditRequest:
    if not isinstance(rewrite, dict):
        raise DataError(f"{where}: {name} must be an object, got {type(rewrite).__name__}")
    subject = text(rewrite, "subject", where, f"{name}.subject")
    pattern = text(rewrite, "prompt", where, f"{name}.prompt", prompt=True)
    prompt = with_subject(pattern, subject, where, f"{name}.prompt")
    new = text(section(rewrite, "target_new", where, f"{name}.target_new"), "str", where, f"{name}.target_new.str")
    true = text(section(rewrite, "target_true", where, f"{name}.target_true"), "str", where, f"{name}.target_true.str")
    relation = text(rewrite, "relation_id", where, f"{name}.relation_id", required=False)
    with checked(where):
        return EditRequest((prompt,), true, new, subject=subject, relation=relation)


def mquake_case(obj: dict, where: str, index: int) -> BenchmarkCase:
    rewrites = obj.get("requested_rewrite")
    if not isinstance(rewrites, list) or not rewrites:
        raise DataError(f"{where}: 'requested_rewrite' must be a non-empty list of edits, got "
                        f"{type(rewrites).__name__ if rewrites is not None else 'nothing'}")
    requests = tuple(_request(r, where, f"requested_rewrite[{j}]") for j, r in enumerate(rewrites))
    questions = texts(obj, "questions", where, prompt=True)
    if not questions:
        raise DataError(f"{where}: 'questions' is empty")
    before_aliases = texts(obj, "answer_alias", where, required=False)
    before_aliases += texts(obj, "answer_extended", where, required=False)  # MQuAKE-T's other gold answers
    with checked(where):
        probe = Probe("multihop", questions, text(obj, "new_answer", where),
                      aliases=texts(obj, "new_answer_alias", where, required=False),
                      before=text(obj, "answer", where), before_aliases=tuple(dict.fromkeys(before_aliases)))
    return BenchmarkCase(case_id(obj, index, where), "mquake", requests, (probe,), where=where)


def read_mquake(path: str | Path) -> CaseList:
    """The cases of an MQuAKE file (layout in the module docstring)."""
    return read_cases(path, "mquake", mquake_case)
