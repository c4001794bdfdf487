"""What an edit aims at on each prompt: the tokens of old and new, the answer step where they part, the
embedding rows E(x) the rules use, and the checks "does the model predict old" and "is new top-1".

E(x) is the **output embedding** (unembedding) row of token x, the direction that raises x's logit; in models
with tied embeddings (SmolLM2, GPT-2, BERT, Gemma) it equals the input word embedding the paper names.
Multi-token objects: the ``paper`` and ``unscaled`` rules use the mean of the rows of all the object's tokens;
the ``signed`` rule reads its activations at the first token where old and new differ (``split``), with the
common prefix teacher-forced; the ``contrast`` and ``new`` directions also check success there, the
``gradient`` direction on every token of new (``token_steps``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence

import torch

from ..errors import EditError, TargetError
from ..models.prompts import AnswerStep

if TYPE_CHECKING:
    from ..models.model import KnModel


@dataclass(frozen=True)
class UpdateTarget:
    """One request's update, encoded. ``new_steps[p]`` predicts ``new_ids[split]`` after prompt p;
    ``token_steps[p]`` predict every token of new after prompt p (teacher-forced)."""

    prompts: tuple[str, ...]
    old_ids: tuple[int, ...]
    new_ids: tuple[int, ...]
    split: int
    new_steps: tuple[AnswerStep, ...]
    token_steps: tuple[tuple[AnswerStep, ...], ...]

    @property
    def new_token(self) -> int:
        return self.new_ids[self.split]

    @property
    def old_token(self) -> int:
        return self.old_ids[self.split]


def update_target(km: KnModel, prompts: Sequence[str], old: str, new: str) -> UpdateTarget:
    """Encode an update of ``old`` into ``new`` on every prompt (token ids taken after the first prompt)."""
    encodings = [(km.encode(p, old), km.encode(p, new)) for p in prompts]
    old_ids, new_ids = encodings[0][0].target_ids, encodings[0][1].target_ids
    if old_ids == new_ids:
        raise EditError(f"old {old!r} and new {new!r} are the same tokens: nothing to edit")
    split = next((j for j, (a, b) in enumerate(zip(old_ids, new_ids)) if a != b), min(len(old_ids), len(new_ids)))
    if split >= len(new_ids) or split >= len(old_ids):
        shorter, longer = (new, old) if split >= len(new_ids) else (old, new)
        raise EditError(
            f"{shorter!r} is a prefix of {longer!r} (as tokens): no answer token tells them apart; "
            "choose objects that differ in some token"
        )
    steps = []
    for (p, (enc_old, enc_new)) in zip(prompts, encodings):
        if enc_new.target_ids[:split] != new_ids[:split] or len(enc_new.steps) <= split:
            raise TargetError(f"{new!r} tokenizes differently after prompt {p!r}; give prompts that end alike")
        steps.append(enc_new.steps[split])
    return UpdateTarget(tuple(prompts), tuple(old_ids), tuple(new_ids), split, tuple(steps),
                        tuple(tuple(enc_new.steps) for _, enc_new in encodings))


def embedding(km: KnModel, ids: Sequence[int]) -> torch.Tensor:
    """E of a token sequence [d_model] (float32, CPU): the mean of its output-embedding rows."""
    return km.output_embedding(list(ids)).detach().float().cpu().mean(dim=0)


def margins(km: KnModel, steps: Sequence[AnswerStep], with_rivals: bool = False):
    """[n_steps]: logit of each step's target minus the largest other logit (> 0 iff the target is top-1);
    with_rivals: also the token of that largest other logit [n_steps]."""
    logits = km.step_logits(list(steps)).cpu()  # [n, vocab]
    gold = torch.tensor([s.target_id for s in steps])
    rows = torch.arange(len(steps))
    target = logits[rows, gold].clone()
    logits[rows, gold] = float("-inf")
    best = logits.max(dim=-1)
    return (target - best.values, best.indices) if with_rivals else target - best.values


def prompt_margins(km: KnModel, groups: Sequence[Sequence[AnswerStep]]) -> torch.Tensor:
    """[n_groups]: per group (one prompt's answer steps), the smallest margin over its steps."""
    flat = [step for group in groups for step in group]
    m = margins(km, flat)
    out, at = [], 0
    for group in groups:
        out.append(m[at : at + len(group)].min())
        at += len(group)
    return torch.stack(out)


def unpredicted(km: KnModel, prompts: Sequence[str], target: str) -> list[tuple[str, str]]:
    """Prompts on which greedy decoding does not give ``target`` (every teacher-forced token top-1),
    each with the token the model predicts at the first miss."""
    misses = []
    for prompt in prompts:
        steps = km.encode(prompt, target).steps
        logits = km.step_logits(list(steps))  # [n_tokens, vocab]
        for step, row in zip(steps, logits):
            top = int(row.argmax())
            if top != step.target_id:
                misses.append((prompt, km.tokenizer.decode([top])))
                break
    return misses


def require_predicted(km: KnModel, prompts: Sequence[str], target: str, force: bool) -> list[tuple[str, str]]:
    """Raise unless the model predicts ``target`` on every prompt (or ``force``); return the misses."""
    misses = unpredicted(km, prompts, target)
    if misses and not force:
        shown = "; ".join(f"{p!r} → {t!r}" for p, t in misses[:5])
        raise EditError(
            f"the model does not predict {target!r} on {len(misses)} of {len(prompts)} prompts ({shown}); "
            "edits are meant for facts the model knows. Pass force=True (--force) to edit anyway"
        )
    return misses
