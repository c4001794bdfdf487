"""CounterFact (Meng et al. 2022, ROME): one counterfactual edit per record, with the prompts its scores read.

A record (the ROME project's ``counterfact.json``, MEMIT's ``multi_counterfact.json``; kn-edit's ``make-counterfact``
writes the same layout)::

    {"case_id": 0, "pararel_idx": 2796,
     "requested_rewrite": {"prompt": "The mother tongue of {} is", "subject": "Danielle Darrieux",
                           "relation_id": "P103", "target_new": {"str": "English", "id": "Q1860"},
                           "target_true": {"str": "French", "id": "Q150"}},
     "paraphrase_prompts": [...], "neighborhood_prompts": [...], "attribute_prompts": [...],
     "generation_prompts": [...]}

Read into one BenchmarkCase: the edit (the rewrite prompt with ``{}`` filled, true → new); probes ``paraphrase``
(answer new, contrast true), ``neighborhood`` (other subjects with the same true object: answer true, contrast
new) and ``attribute`` (subjects whose true object is the new one: answer new, contrast true); the generation
prompts as they are. ``paraphrase_prompts`` and ``neighborhood_prompts`` are required (they may be empty lists),
``attribute_prompts``, ``generation_prompts``, ``relation_id``, the targets' ``id`` and ``pararel_idx`` are
optional. Prompts are causal (the text before the answer). ROME's reference score reads texts about the new
object from a separate file (``attribute_snippets.json``), not read here: ``reference_texts`` stays empty.
"""

from __future__ import annotations

from pathlib import Path

from ..records import BenchmarkCase, EditRequest, Probe
from .fields import CaseList, case_id, checked, read_cases, section, text, texts, with_subject


def counterfact_case(obj: dict, where: str, index: int) -> BenchmarkCase:
    rewrite = section(obj, "requested_rewrite", where)
    subject = text(rewrite, "subject", where, "requested_rewrite.subject")
    prompt = with_subject(text(rewrite, "prompt", where, "requested_rewrite.prompt", prompt=True), subject, where,
                          "requested_rewrite.prompt")
    new = text(section(rewrite, "target_new", where, "requested_rewrite.target_new"), "str", where,
               "requested_rewrite.target_new.str")
    true = text(section(rewrite, "target_true", where, "requested_rewrite.target_true"), "str", where,
                "requested_rewrite.target_true.str")
    relation = text(rewrite, "relation_id", where, "requested_rewrite.relation_id", required=False)
    sets = [("paraphrase", "paraphrase_prompts", new, true, True),  # kind, key, answer, contrast, required
            ("neighborhood", "neighborhood_prompts", true, new, True),
            ("attribute", "attribute_prompts", new, true, False)]  # fmt: skip
    with checked(where):
        request = EditRequest((prompt,), true, new, subject=subject, relation=relation)
        probes = tuple(Probe(kind, prompts, answer, contrast)
                       for kind, key, answer, contrast, required in sets
                       if (prompts := texts(obj, key, where, required=required, prompt=True)))  # fmt: skip
    generation = texts(obj, "generation_prompts", where, required=False, prompt=True)
    return BenchmarkCase(case_id(obj, index, where), "counterfact", (request,), probes, generation, where=where)


def read_counterfact(path: str | Path) -> CaseList:
    """The cases of a CounterFact file (layout in the module docstring)."""
    return read_cases(path, "counterfact", counterfact_case)
