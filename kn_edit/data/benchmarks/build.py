"""A CounterFact-style set built offline from ParaRel, written in CounterFact's JSON layout (``counterfact.py``), so
that kn-edit's reader, and any tool that reads ROME's ``counterfact.json``, read it.

Per fact ⟨s, r, o⟩ of the FactSet (causal prompts, as ``load_pararel(masked=False)`` gives them):

* rewrite prompt: the first of the fact's edit prompts that holds its subject once, with ``{}`` in its place;
* target_new: another object of the relation (``choose_new_object``: seeded per fact), target_true: o;
* paraphrase prompts: the fact's other prompts, held-out patterns first (``load_pararel``'s split), up to
  ``paraphrases``;
* neighborhood prompts: up to ``neighbours`` other subjects of r whose true object is also o (seeded draw), each
  in one of its own ParaRel prompts (patterns taken in turn);
* attribute prompts: likewise up to ``attributes`` subjects of r whose true object is target_new;
* generation prompts: up to ``generation`` short prompts that begin with the subject: the fact's own prompts that
  do, then "{subject} is", "{subject} was", "{subject} has".

A fact enters only where it gets at least one prompt of each kind asked for (a relation with one usable pattern has
no paraphrase; an object no other subject shares has no neighbourhood). ``n`` of the eligible facts are drawn with
``random.Random(seed)``, kept in the FactSet's order, and numbered ``case_id`` 0.. ; ``pararel_idx`` is the fact's
position in the FactSet and the target ``id`` is null (ParaRel's facts carry no Wikidata ids of objects).

The set does not depend on a model: an evaluation keeps only the facts its model knows (the evaluation's
``only_known`` check), as the ROME paper evaluates on facts GPT-2 XL predicts.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Sequence

from ...errors import ConfigError, DataError
from ...storage.atomic import atomic_file
from ..records import FactRecord, FactSet
from ..requests import choose_new_object, relation_objects

GENERIC_STARTS = ("{} is", "{} was", "{} has")


def subject_pattern(prompt: str, subject: str) -> str | None:
    """``prompt`` with its subject replaced by ``{}``, or None where the subject is not in it exactly once."""
    if "{" in prompt or "}" in prompt or prompt.count(subject) != 1:
        return None
    return prompt.replace(subject, "{}")


def check_causal(facts: FactSet) -> None:
    """DataError where the FactSet holds masked-LM prompts: the built sets are next-token prompts."""
    for record in facts.records:
        if any("[Y]" in p or "[MASK]" in p for p in record.all_prompts):
            raise DataError(f"fact {record.fact_id} has masked-LM prompts; build from ParaRel read for causal LMs "
                            "(masked=False)")


def check_counts(**counts: int) -> None:
    for name, value in counts.items():
        least = 1 if name in ("n", "questions") else 0
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            raise ConfigError(f"{name} must be a whole number of at least {least}, got {value!r}")


def by_subject_object(records: Sequence[FactRecord]) -> dict[tuple[str, str], list[FactRecord]]:
    """{(relation, object): its facts, one per subject}."""
    out: dict[tuple[str, str], dict[str, FactRecord]] = {}
    for r in records:
        if r.all_prompts:
            out.setdefault((r.relation, r.object), {}).setdefault(r.subject, r)
    return {key: list(facts.values()) for key, facts in out.items()}


def _others(record: FactRecord, group: list[FactRecord], k: int, rng: random.Random) -> list[str]:
    """Prompts of up to ``k`` other subjects of ``group`` (a seeded draw), each in one of its own prompts in turn."""
    subjects = [r for r in group if r.subject != record.subject]
    picked = rng.sample(subjects, min(k, len(subjects)))
    return [r.all_prompts[i % len(r.all_prompts)] for i, r in enumerate(picked)]


def _case(record: FactRecord, index: int, pool: dict, groups: dict, seed: int, counts: dict) -> dict | None:
    rewrite = next((pat for p in record.prompts if (pat := subject_pattern(p, record.subject))), None)
    new = choose_new_object(record, pool[record.relation], seed)
    if rewrite is None or new is None:
        return None
    filled = rewrite.replace("{}", record.subject)
    rng = random.Random(f"{seed}:{record.fact_id}")
    found = {
        "paraphrase": [p for p in dict.fromkeys(record.heldout_prompts + record.prompts) if p != filled],
        "neighborhood": _others(record, groups[(record.relation, record.object)], counts["neighborhood"], rng),
        "attribute": _others(record, groups.get((record.relation, new), []), counts["attribute"], rng),
    }
    if any(counts[kind] and not prompts for kind, prompts in found.items()):
        return None
    starts = [p for p in record.all_prompts if p.startswith(record.subject)]
    starts += [g.format(record.subject) for g in GENERIC_STARTS]
    return {
        "case_id": None, "pararel_idx": index,
        "requested_rewrite": {"prompt": rewrite, "subject": record.subject, "relation_id": record.relation,
                              "target_new": {"str": new, "id": None},
                              "target_true": {"str": record.object, "id": None}},
        "paraphrase_prompts": found["paraphrase"][: counts["paraphrase"]],
        "neighborhood_prompts": found["neighborhood"],
        "attribute_prompts": found["attribute"],
        "generation_prompts": list(dict.fromkeys(starts))[: counts["generation"]],
    }  # fmt: skip


def build_counterfact(facts: FactSet, *, n: int = 1000, seed: int = 0, paraphrases: int = 2, neighbours: int = 10,
                      attributes: int = 10, generation: int = 5) -> list[dict]:
    """Up to ``n`` CounterFact records built from ParaRel facts (rules in the module docstring); fewer where fewer
    facts are eligible, DataError where none is."""
    check_counts(n=n, paraphrases=paraphrases, neighbours=neighbours, attributes=attributes, generation=generation)
    check_causal(facts)
    counts = {"paraphrase": paraphrases, "neighborhood": neighbours, "attribute": attributes, "generation": generation}
    pool, groups = relation_objects(facts.records), by_subject_object(facts.records)
    eligible = [c for i, r in enumerate(facts.records) if (c := _case(r, i, pool, groups, seed, counts)) is not None]
    if not eligible:
        raise DataError(f"no fact of {facts.name} has the paraphrases, neighbours and attributes asked for")
    chosen = sorted(random.Random(seed).sample(range(len(eligible)), min(n, len(eligible))))
    records = [eligible[i] for i in chosen]
    for number, record in enumerate(records):
        record["case_id"] = number
    return records


def write_benchmark(records: Sequence[dict], path: str | Path, *, overwrite: bool = False) -> Path:
    """Write benchmark records (CounterFact's or MQuAKE's layout) as a JSON list, or one a line where ``path`` ends
    in ``.jsonl``; atomically, and never over an existing file unless ``overwrite``."""
    path = Path(path)
    with atomic_file(path, overwrite=overwrite, what="benchmark file") as tmp, open(tmp, "w", encoding="utf-8") as out:
        if path.suffix.lower() == ".jsonl":
            out.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
        else:
            json.dump(list(records), out, ensure_ascii=False, indent=1)
            out.write("\n")
    return path
