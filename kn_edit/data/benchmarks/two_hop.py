"""Two-hop chains built offline from ParaRel, written in MQuAKE's layout (``mquake.py``), so that whether an edit
carries to the facts that follow from it is measured without downloads.

A chain is a fact ⟨s, r1, o1⟩ whose object is the subject of a fact ⟨o1, r2, o2⟩: "Marie Curie was born in
Warsaw" and "Warsaw is the capital of Poland". The edit moves the first hop to another object o1' of r1 that is
itself the subject of an r2 fact with another answer o2' (o1' seeded per fact, ``choose_new_object``); the
questions ask for the composed chain, so the answer is o2 before the edit and o2' after it.

Only the relation pairs that compose into one answer are used: r1 in ``FIRST_HOPS`` (a hand-written noun phrase
naming o1 through s) and r2 in ``SECOND_HOPS`` (functional relations), o1 and o1' each with one r2 fact. Questions
are cloze prompts: r2's prompts for o1 with o1 replaced by r1's noun phrase ("The capital of the country of
citizenship of Vince McMahon is"), up to ``questions`` of them; prompts where o1 is followed by "'s" are left out
(the possessive would attach to s). ``single_hops`` and ``new_single_hops`` hold the two hops' cloze prompts (the
MQuAKE ``question`` field repeats the cloze: ParaRel has no questions); ``orig.triples_labeled`` the chains.
``n`` chains are drawn with ``random.Random(seed)`` from every eligible (fact, r2) pair.
"""

from __future__ import annotations

import random

from ...errors import DataError
from ..records import FactRecord, FactSet
from ..requests import choose_new_object
from .build import check_causal, check_counts, subject_pattern

# How a first hop's object is named through its subject (Wikidata relation ids, as ParaRel's files are named).
FIRST_HOPS = {
    "P17": "the country of {}",
    "P19": "the birthplace of {}",
    "P20": "the place of death of {}",
    "P27": "the country of citizenship of {}",
    "P131": "the place where {} is located",
    "P159": "the city where {} is headquartered",
    "P495": "the country of origin of {}",
    "P740": "the place where {} was founded",
    "P937": "the place where {} worked",
}
# Relations with one answer per subject: country, continent, capital, official language, capital of.
SECOND_HOPS = ("P17", "P30", "P36", "P37", "P1376")


def _single(by_relation: dict[str, list[FactRecord]]) -> dict[tuple[str, str], FactRecord]:
    """{(r2, subject): its fact} for the subjects that have exactly one fact in r2."""
    out: dict[tuple[str, str], FactRecord] = {}
    seen: set[tuple[str, str]] = set()
    for relation in SECOND_HOPS:
        for record in by_relation.get(relation, []):
            key = (relation, record.subject)
            if key in seen:
                out.pop(key, None)
            elif record.prompts:
                out[key] = record
            seen.add(key)
    return out


def _questions(second: FactRecord, noun: str, k: int) -> list[str]:
    out = []
    for prompt in second.all_prompts:
        pattern = subject_pattern(prompt, second.subject)
        if pattern is not None and "{}'s" not in pattern:
            text = pattern.replace("{}", noun)
            out.append(text[:1].upper() + text[1:])
    return out[:k]


def _hop(record: FactRecord) -> dict:
    return {"question": record.prompts[0], "cloze": record.prompts[0], "answer": record.object, "answer_alias": []}


def _chain(first: FactRecord, r2: str, seconds: dict, pool: list[str], seed: int, k: int) -> dict | None:
    second = seconds.get((r2, first.object))
    rewrite = next((pat for p in first.prompts if (pat := subject_pattern(p, first.subject))), None)
    if second is None or rewrite is None:
        return None
    noun = FIRST_HOPS[first.relation].format(first.subject)
    questions = _questions(second, noun, k)
    moved = lambda o: (r2, o) in seconds and seconds[(r2, o)].object != second.object  # noqa: E731
    new = choose_new_object(first, pool, seed, usable=moved)
    if not questions or new is None:
        return None
    new_second = seconds[(r2, new)]
    new_first = FactRecord(first.fact_id, first.subject, first.relation, new, (rewrite.replace("{}", first.subject),))
    return {
        "case_id": None,
        "requested_rewrite": [{"prompt": rewrite, "subject": first.subject, "relation_id": first.relation,
                               "target_new": {"str": new, "id": None}, "target_true": {"str": first.object, "id": None},
                               "question": rewrite.replace("{}", first.subject)}],
        "questions": questions,
        "answer": second.object, "answer_alias": [],
        "new_answer": new_second.object, "new_answer_alias": [],
        "single_hops": [_hop(first), _hop(second)],
        "new_single_hops": [_hop(new_first), _hop(new_second)],
        "orig": {"triples_labeled": [[first.subject, first.relation, first.object],
                                     [second.subject, r2, second.object]],
                 "new_triples_labeled": [[first.subject, first.relation, new],
                                         [new_second.subject, r2, new_second.object]],
                 "edit_triples_labeled": [[first.subject, first.relation, new]]},
    }  # fmt: skip


def build_two_hop(facts: FactSet, *, n: int = 1000, seed: int = 0, questions: int = 3) -> list[dict]:
    """Up to ``n`` two-hop MQuAKE records built from ParaRel facts (rules in the module docstring); fewer where
    fewer chains exist, DataError where none does."""
    check_counts(n=n, questions=questions)
    check_causal(facts)
    by_relation = facts.by_relation()
    seconds = _single(by_relation)
    chains = []
    for r1 in sorted(set(FIRST_HOPS) & set(by_relation)):
        pool = sorted({r.object for r in by_relation[r1]})
        for first in by_relation[r1]:
            for r2 in SECOND_HOPS:
                if r2 != r1 and (chain := _chain(first, r2, seconds, pool, seed, questions)) is not None:
                    chains.append(chain)
    if not chains:
        raise DataError(f"{facts.name} has no two-hop chain: it needs facts of {', '.join(FIRST_HOPS)} whose objects "
                        f"are subjects of {', '.join(SECOND_HOPS)}")
    chosen = sorted(random.Random(seed).sample(range(len(chains)), min(n, len(chains))))
    records = [chains[i] for i in chosen]
    for number, record in enumerate(records):
        record["case_id"] = number
    return records
