"""zsRE in the MEND / ROME form (Mitchell et al. 2022; ROME's ``zsre_mend_eval.json``): question answering edits.

A record::

    {"subject": "Epaspidoceras", "src": "Which family does Epaspidoceras belong to?", "pred": "...",
     "rephrase": "What family are Epaspidoceras?", "alt": "Noctuidae", "answers": ["Aspidoceratidae"],
     "loc": "nq question: who played desmond doss father in hacksaw ridge", "loc_ans": "Hugo Weaving",
     "cond": "..."}

Read into one BenchmarkCase: the edit ``src`` → ``alt`` (the true answer ``answers[0]``; ``pred``, the MEND
model's own prediction, and ``cond`` are not used), as EasyEdit reads it; ``rephrase`` is the ``paraphrase`` probe
(answer ``alt``) and ``loc`` / ``loc_ans`` the ``locality`` probe. zsRE is scored by token accuracy, so probes have no
contrast. Prompts: the questions are used as they are, the answer following after one space (kn-edit's prompt
convention); ``loc`` (a Natural Questions question written without its question mark) gets a "?" where it has
none, as ROME's evaluation adds it. Records whose ``alt`` is empty or equals the true answer request no edit: they
are set aside and counted in ``skipped`` (EasyEdit drops the former silently).
"""

from __future__ import annotations

from pathlib import Path

from ..records import BenchmarkCase, EditRequest, Probe, SkippedFact
from .fields import CaseList, answers, checked, read_cases, text


def zsre_case(obj: dict, where: str, index: int) -> BenchmarkCase | SkippedFact:
    subject = text(obj, "subject", where)
    question = text(obj, "src", where, prompt=True)
    true = answers(obj, "answers", where)[0]
    alt = obj.get("alt")
    if isinstance(alt, str) and alt.strip() in ("", true):
        why = "no new answer (alt is empty)" if not alt.strip() else "alt equals the true answer"
        return SkippedFact(str(index), "", why, where)
    new = text(obj, "alt", where)
    rephrase = text(obj, "rephrase", where, prompt=True)
    loc = text(obj, "loc", where, prompt=True)
    loc = loc if loc.endswith("?") else loc + "?"
    with checked(where):
        request = EditRequest((question,), true, new, subject=subject)
        probes = (Probe("paraphrase", (rephrase,), new), Probe("locality", (loc,), text(obj, "loc_ans", where)))
    return BenchmarkCase(str(index), "zsre", (request,), probes, where=where)


def read_zsre(path: str | Path) -> CaseList:
    """The cases of a zsRE file (layout in the module docstring)."""
    return read_cases(path, "zsre", zsre_case)
