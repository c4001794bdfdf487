"""Measuring a benchmark case on the model as it is: every (prompt, target) of its groups teacher-forced in one
batched pass (``KnModel.step_logits``, as ``module.score_pairs``), and, where asked, greedy continuations of
every prompt (``fluency.greedy_generations``). The metrics themselves are in ``benchmark_metrics``."""

from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

import torch

from .benchmark_metrics import Generated, Group, Key, Measured
from .fluency import greedy_generations

if TYPE_CHECKING:
    from ..models.model import KnModel


def pairs_of(groups: Sequence[Group]) -> list[tuple[Key, str, str]]:
    """(key, prompt, target) of every target after every prompt of the groups."""
    return [((g, i, t), prompt, t) for g, grp in enumerate(groups) for i, prompt in enumerate(grp.prompts)
            for t in grp.targets()]  # fmt: skip


@torch.no_grad()
def measure(km: KnModel, groups: Sequence[Group], batch_size: int = 64) -> dict[Key, Measured]:
    """Each target after each prompt: mean token log P, per-token argmax and hit (teacher-forced)."""
    pairs = pairs_of(groups)
    steps, owner = [], []
    for n, (_, prompt, target) in enumerate(pairs):
        for step in km.encode(prompt, target).steps:
            steps.append(step)
            owner.append(n)
    logits = km.step_logits(steps, batch_size=batch_size)
    gold = torch.tensor([s.target_id for s in steps], device=logits.device)
    logp = torch.log_softmax(logits.float(), dim=-1).gather(1, gold[:, None])[:, 0].tolist()
    argmax = logits.argmax(-1).tolist()
    gold = gold.tolist()
    per: list[list[int]] = [[] for _ in pairs]
    for j, n in enumerate(owner):
        per[n].append(j)
    return {key: Measured(sum(logp[j] for j in js) / len(js), tuple(argmax[j] for j in js),
                          tuple(argmax[j] == gold[j] for j in js))
            for (key, _, _), js in zip(pairs, per)}  # fmt: skip


def generate(km: KnModel, groups: Sequence[Group], measured: dict[Key, Measured], extra_tokens: int,
             batch_size: int = 16) -> Generated:
    """Greedy continuation of every prompt of the groups, (longest answer or alias of the case, in tokens) +
    ``extra_tokens`` tokens long."""
    longest = max((len(m.hits) for m in measured.values()), default=1)
    keys = [(g, i) for g, grp in enumerate(groups) for i in range(len(grp.prompts))]
    prompts = [groups[g].prompts[i] for g, i in keys]
    gens = greedy_generations(km, prompts, longest + extra_tokens, batch_size=batch_size) if prompts else []
    return {key: gen.continuation for key, gen in zip(keys, gens)}


__all__ = ["generate", "measure", "pairs_of"]
