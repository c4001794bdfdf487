"""The other subjects an edit would move most, found among many names, for the solve to hold still.

A least-change update that gives k* the shift δ gives another key k the share wᵀk of δ, w = C⁻¹k*/(k*ᵀC⁻¹k*)
(kn_edit/editing/rome/update.py). Subjects that share much of k* in that metric (other Apple products for
"MacBook Air", other French writers for "Delphine de Girardin") get much of the new answer: the same-object
neighbours an edit moves. Among the names of ``cov_subject_names`` (kn_edit.editing.keyvalue.statistics: their keys
averaged over the context prefixes, as k* is), the ``count`` with the largest share are those subjects; a solve
that also maps their keys to no change (kn-subject's preserved keys) keeps them.

Names that are the subject itself or hold it ("Apple" for "Apple Inc.", either way, ignoring case) are never
taken, nor a name whose share is MAX_SHARE or more: its key is nearly k*, so holding it still would fight the
edit itself (the subject's own paraphrases).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence

import torch

from .keys import keys_at, prompt_text, start_text, subject_end, subject_texts
from .solve import exact_direction
from .statistics import SubjectStatistics

if TYPE_CHECKING:
    from ...models.model import KnModel

MAX_SHARE = 0.8  # a name sharing this much of k*'s shift is as good as the subject: left alone
MIN_SHARE = 0.05  # a name sharing less than this would hardly move: not worth a constraint


@dataclass(frozen=True)
class Nearest:
    """The names held still for one subject, with the share of δ each would have got, largest first."""

    subject: str
    names: tuple[str, ...]
    shares: tuple[float, ...]
    keys: torch.Tensor  # [len(names), d_ff] float32


def overlaps(name: str, subject: str) -> bool:
    """Whether ``name`` is ``subject`` or one holds the other (ignoring case)."""
    a, b = name.casefold().strip(), subject.casefold().strip()
    return a in b or b in a


def shares(mom2: torch.Tensor, key: torch.Tensor, keys: torch.Tensor, ridge: float = 0.0,
           factors: dict | None = None) -> torch.Tensor:
    """[n] float64: wᵀk_j for each row k_j of ``keys``, w the least-change direction of ``key`` in C (``mom2``)."""
    return keys.to(torch.float64) @ exact_direction(mom2, key[None], ridge, factors)


def substituted(prompt: str, subject: str, name: str) -> str:
    """``prompt`` (as kn-edit encodes it) with its subject's last occurrence replaced by ``name``: the same question
    about another subject ("The native language of Maurice Faure is")."""
    text = prompt_text(prompt)
    end = subject_end(text, subject)
    return text[: end - len(subject.strip())] + name + text[end:]


def swapped(prompt: str, subject: str, name: str) -> str:
    """:func:`substituted` cut after ``name``: the text in which ``name``'s key shares the edit prompt's context
    ("The native language of Maurice Faure")."""
    text = prompt_text(prompt)
    return substituted(text, subject, name)[: subject_end(text, subject) - len(subject.strip()) + len(name)]


def ranked_names(names: Sequence[str], share: torch.Tensor, subject: str, count: int,
                 max_share: float | None = MAX_SHARE) -> list[int]:
    """Indices of the ``count`` names (at most) with the largest ``share``, leaving out names overlapping
    ``subject``, shares under MIN_SHARE and, given ``max_share``, shares of it or more."""
    allowed = torch.tensor([not overlaps(n, subject) for n in names], dtype=torch.bool) & (share >= MIN_SHARE)
    if max_share is not None:
        allowed &= share < max_share
    return [int(i) for i in torch.argsort(share, descending=True) if allowed[i]][:count]


def held_keys(km: KnModel, layer: int, names: Sequence[str], subject: str, prompts: Sequence[str],
              subject_start: bool) -> torch.Tensor:
    """[n, d_ff]: the keys of ``names`` where an edit's extra keys would move them most: in each edit prompt in
    place of the subject (the keys fit=prompts moves share the prompt's context with every subject in it) and,
    with ``subject_start``, alone at the start of a text (start keys share the first positions' component)."""
    texts = []
    for name in names:
        texts += subject_texts(km, name, [swapped(p, subject, name) for p in prompts], [""], whole_subject=False)
        if subject_start and (start := start_text(km, name)) is not None:
            texts.append(start)
    return keys_at(km, layer, texts) if texts else torch.zeros(0, km.d_ff)


def nearest_subjects(km: KnModel, layer: int, subject: str, prefixes: Sequence[str], found: SubjectStatistics,
                     mom2: torch.Tensor, count: int, ridge: float = 0.0, factors: dict | None = None) -> Nearest:
    """The ``count`` names of ``found`` (at most) whose keys would share most of an update made for ``subject``'s
    key k* (averaged over ``prefixes``, as the editors take it), leaving out overlapping names and those sharing
    MAX_SHARE or more or under MIN_SHARE (see the module docstring)."""
    key = keys_at(km, layer, subject_texts(km, subject, [], prefixes, whole_subject=True)).mean(dim=0)
    share = shares(mom2, key, found.keys, ridge, factors)
    order = ranked_names(found.names, share, subject, count)
    return Nearest(subject, tuple(found.names[i] for i in order), tuple(float(share[i]) for i in order),
                   found.keys[order] if order else torch.zeros(0, found.keys.shape[1]))
