"""KnowEdit (Zhang et al. 2024) in EasyEdit's JSON: an edit with the portability and locality checks around it.

A record (``ZsRE-test-all.json``, ``wiki_counterfact/test_cf.json``, ...)::

    {"subject": "Frederic Piesch", "prompt": "The name of the position held by Frederic Piesch is",
     "target_new": "Archbishop of León, Mexico", "ground_truth": "mayor of Vienna",
     "rephrase_prompt": "...",                                                   # optional
     "portability": {"Subject_Aliasing": [{"prompt": "...", "ground_truth": "..."}], ...},  # optional
     "locality": {"Relation_Specificity": [{"prompt": "...", "ground_truth": ["male"]}], ...}}  # optional

``ground_truth`` comes as a string, a list of aliases, or a list of alias lists (``[["Berlin", "Berlin, Germany"]]``):
the first string is the answer, the others its aliases; a check's ``prompt`` is a string or a list of them.
Read into one BenchmarkCase: the edit ``prompt`` → ``target_new`` (old: the first ground truth); probes
``paraphrase`` (``rephrase_prompt``, answer ``target_new``), one ``portability`` probe per check (label: its kind in
lower case: ``reasoning``, ``subject_aliasing``, ``logical_generalization``) and one ``locality`` probe per check
(``relation_specificity``, ``forgetfulness``). Scored by token accuracy: no contrast. Prompts are used as they are.
Records without ``ground_truth`` (the insertion set wiki_recent) are refused: kn-edit's edits change an answer the
model has. WikiBio, ConvSent and Sanitation (other layouts) are not read.
"""

from __future__ import annotations

from pathlib import Path

from ...errors import DataError
from ..records import BenchmarkCase, EditRequest, Probe
from .fields import CaseList, answers, checked, read_cases, section, text, texts


def _checks(obj: dict, kind: str, where: str) -> list[Probe]:
    probes = []
    for label, items in section(obj, kind, where, required=False).items():
        if not isinstance(items, list):
            raise DataError(f"{where}: '{kind}.{label}' must be a list of checks, got {type(items).__name__}")
        for j, item in enumerate(items):
            name = f"{kind}.{label}[{j}]"
            if not isinstance(item, dict):
                raise DataError(f"{where}: {name!r} must be an object, got {type(item).__name__}")
            prompts = texts(item, "prompt", where, f"{name}.prompt", one_ok=True, prompt=True)
            if not prompts:
                raise DataError(f"{where}: '{name}.prompt' is empty")
            truth = answers(item, "ground_truth", where, f"{name}.ground_truth")
            probes.append(Probe(kind, prompts, truth[0], aliases=truth[1:], label=label.lower()))
    return probes


def knowedit_case(obj: dict, where: str, index: int) -> BenchmarkCase:
    subject = text(obj, "subject", where)
    prompt = text(obj, "prompt", where, prompt=True)
    new = text(obj, "target_new", where)
    if obj.get("ground_truth") is None:
        raise DataError(f"{where}: missing field 'ground_truth' (the answer before the edit; insertion sets such "
                        "as wiki_recent have none, and kn-edit edits change an existing answer)")
    true = answers(obj, "ground_truth", where)[0]
    rephrase = texts(obj, "rephrase_prompt", where, required=False, one_ok=True, prompt=True)
    with checked(where):
        request = EditRequest((prompt,), true, new, subject=subject)
        probes = ([Probe("paraphrase", rephrase, new)] if rephrase else []) + _checks(obj, "portability", where) \
            + _checks(obj, "locality", where)
    return BenchmarkCase(str(index), "knowedit", (request,), tuple(probes), where=where)


def read_knowedit(path: str | Path) -> CaseList:
    """The cases of a KnowEdit / EasyEdit file (layout in the module docstring)."""
    return read_cases(path, "knowedit", knowedit_case)
