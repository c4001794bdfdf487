"""Edit requests built the paper's way: only facts the model predicts correctly are edited, and the new object
is another object of the same relation (seeded, reproducible per fact).

* Expressible: every prompt of the fact encodes with its object (the tokenizer can express the object);
  facts that fail are skipped with the reason, never dropped silently.
* Known: on at least ``min_share`` of its edit prompts, every teacher-forced token of the object is the
  model's top-1 prediction (so greedy decoding reproduces the object). Checked in batches.
* New object: the other objects of the relation in the pool, shuffled with ``random.Random(f"{seed}:{fact_id}")``;
  the first the tokenizer can express after the fact's prompts is taken. The choice of a fact does not depend
  on which other facts a run selected.
"""

from __future__ import annotations

import math
import random
from typing import TYPE_CHECKING, Callable, Sequence

import torch

from .records import EditRequest
from ..errors import PromptError, TargetError
from .records import FactRecord, FactSet, SkippedFact

if TYPE_CHECKING:
    from ..models.model import KnModel


def unusable_reason(km: KnModel, record: FactRecord, target: str | None = None) -> SkippedFact | None:
    """Why the fact cannot be used with this model (its object, or ``target``, does not encode after one of its
    prompts), or None when it can."""
    try:
        for prompt in record.all_prompts:
            km.encode(prompt, record.object if target is None else target)
    except TargetError as exc:
        return SkippedFact(record.fact_id, record.relation, "object not expressible by the tokenizer", str(exc))
    except PromptError as exc:
        return SkippedFact(record.fact_id, record.relation, "prompt not usable with this model", str(exc))
    return None


def expressible(km: KnModel, facts: FactSet) -> FactSet:
    """The facts whose every prompt encodes with their object; the others move to ``skipped``."""
    kept, skipped = [], list(facts.skipped)
    for record in facts.records:
        reason = unusable_reason(km, record)
        if reason is None:
            kept.append(record)
        else:
            skipped.append(reason)
    return FactSet(facts.name, kept, skipped)


@torch.no_grad()
def prompt_top1(km: KnModel, pairs: Sequence[tuple[str, str]], batch_size: int = 64) -> list[bool]:
    """For each (prompt, target): is every teacher-forced target token the top-1 prediction?"""
    steps, owner = [], []
    for i, (prompt, target) in enumerate(pairs):
        for step in km.encode(prompt, target).steps:
            steps.append(step)
            owner.append(i)
    correct = [True] * len(pairs)
    for start in range(0, len(steps), batch_size):
        chunk = steps[start : start + batch_size]
        argmax = km.step_logits(chunk, batch_size=batch_size).argmax(dim=-1).cpu()
        for j, step in enumerate(chunk):
            if int(argmax[j]) != step.target_id:
                correct[owner[start + j]] = False
    return correct


def known_mask(km: KnModel, records: Sequence[FactRecord], min_share: float = 0.5, batch_size: int = 64) -> list[bool]:
    """Whether the model predicts each fact correctly (rule in the module docstring).

    Prompts are checked in rounds, the j-th prompt of every fact still undecided in round j: a fact is decided
    once its share of correct prompts is reached or can no longer be, so most facts a model does not know cost
    one prompt instead of all of them (with ``min_share`` 1.0 a fact is out at its first wrong prompt). The
    flags are exactly those of checking every prompt."""
    n = [len(r.prompts) for r in records]
    need = [math.ceil(min_share * k) for k in n]  # correct prompts needed: sum(flags) >= min_share * n
    right = [0] * len(records)
    undecided = [i for i, k in enumerate(n) if k > 0 and need[i] > 0]
    for j in range(max(n, default=0)):
        if not undecided:
            break
        flags = prompt_top1(km, [(records[i].prompts[j], records[i].object) for i in undecided], batch_size)
        still = []
        for i, ok in zip(undecided, flags):
            right[i] += bool(ok)
            left = n[i] - j - 1
            if right[i] < need[i] <= right[i] + left:
                still.append(i)
        undecided = still
    return [k > 0 and right[i] >= need[i] for i, k in enumerate(n)]


def relation_objects(records: Sequence[FactRecord]) -> dict[str, list[str]]:
    """{relation: sorted distinct objects}: the pool new objects are drawn from."""
    pool: dict[str, set[str]] = {}
    for r in records:
        pool.setdefault(r.relation, set()).add(r.object)
    return {rel: sorted(objs) for rel, objs in pool.items()}


def choose_new_object(
    record: FactRecord, objects: Sequence[str], seed: int, usable: Callable[[str], bool] | None = None
) -> str | None:
    """Another object of the fact's relation (the first ``usable`` one in a seeded order), or None."""
    candidates = sorted({o for o in objects if o.strip() != record.object.strip()})
    random.Random(f"{seed}:{record.fact_id}").shuffle(candidates)
    return next((o for o in candidates if usable is None or usable(o)), None)


def edit_request(record: FactRecord, new: str) -> EditRequest:
    return EditRequest(prompts=record.prompts, old=record.object, new=new, subject=record.subject, relation=record.relation)
