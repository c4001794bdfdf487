"""The text-damage guard: an edit's relative change of perplexity on a small fixed text sample, measured with
the edit applied as a trial (reverted before returning) and bounded by a limit.

The sample: the first ``n`` passages of the Wikipedia key slice (kn_edit/data/text.py), each cut at
``max_tokens`` tokens; disjoint from the held-out passages evaluation measures perplexity on. A few hundred
tokens: one batched forward before and one after, well under a second on smollm2-135m (CPU).

The unedited model's pass is made once per weight state (kn_edit.editing.memo), not for every edit and trial,
and keeps every block's output (within ``_REPLAY_BYTES``). A change leaves the blocks below the lowest block it
touches as they were, so the pass with the change applied runs from that block on, the blocks below handing
back their kept outputs: the same numbers as the whole pass, bit for bit.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING, Sequence

import torch

from ..errors import EditError
from ..models.likelihood import token_nll, tokenized_text
from ..models.replay import KeptPasses, keeping, lowest_block, replaying
from .ledger import SliceChange, commit
from .memo import memoized

if TYPE_CHECKING:
    from ..models.model import KnModel

GUARD_PASSAGES = 8
GUARD_TOKENS = 48
# Every block's output on the sample is kept where it takes at most this much memory (the fixed sample on
# smollm2-135m: 8 × 48 tokens × 576 × 30 blocks, ~27 MB in float32).
_REPLAY_BYTES = 64 * 1024**2


@lru_cache(maxsize=4)
def guard_texts(n: int = GUARD_PASSAGES) -> tuple[str, ...]:
    """The fixed sample: the first ``n`` passages of the Wikipedia key slice (read once per process)."""
    from ..data.text import wiki_key_passages

    return tuple(wiki_key_passages()[:n])


def guard_sample(texts: Sequence[str] | None = None) -> tuple[str, ...]:
    """The guard's sample: ``texts`` where given, else the fixed Wikipedia sample (:func:`guard_texts`)."""
    return tuple(texts) if texts is not None else guard_texts()


def text_change(km: KnModel, changes: Sequence[SliceChange], texts: Sequence[str],
                max_tokens: int = GUARD_TOKENS) -> float:
    """Relative perplexity change exp(NLL_after − NLL_before) − 1 of ``texts`` under ``changes`` (applied as a
    trial and reverted; the model is as before when this returns or raises)."""
    texts = tuple(texts)
    before = memoized(km, "guard_sample", (texts, max_tokens), lambda: _measure(km, texts, max_tokens), keep=2)
    trial = commit(km, "trial", [], list(changes))
    try:
        with replaying(km, before.kept, lowest_block(km, [c.name for c in changes])):
            after = _mean_nll(km, before.ids, before.mask)
    finally:
        trial.revert()
    return math.expm1(after - before.nll)


@dataclass
class _Measured:
    """The sample as one padded batch (ids, mask [batch, seq]), its mean token NLL under the weights it was
    measured with, and every block's output then (``kept.outputs`` None: over _REPLAY_BYTES)."""

    ids: torch.Tensor
    mask: torch.Tensor
    nll: float
    kept: KeptPasses


def _measure(km: KnModel, texts: Sequence[str], max_tokens: int) -> _Measured:
    seqs = tokenized_text(km, texts, max_tokens)
    if not seqs:
        raise EditError("the text-damage guard's sample: the text sample tokenizes to nothing (every passage has "
                        "fewer than two tokens)")
    ids, mask = km.pad(seqs)
    with keeping(km, _REPLAY_BYTES) as kept:
        nll = _mean_nll(km, ids, mask)
    return _Measured(ids, mask, nll, kept)


@torch.no_grad()
def _mean_nll(km: KnModel, ids: torch.Tensor, mask: torch.Tensor) -> float:
    """Mean next-token NLL of a right-padded batch (as kn_edit.models.likelihood.mean_text_nll computes it)."""
    nll, count = token_nll(km.model(input_ids=ids, attention_mask=mask).logits, ids, mask)
    return float(nll / count)


@dataclass
class TextGuard:
    """What the guard measured: ``change`` (relative perplexity change on the sample) against ``limit``."""

    change: float
    limit: float | None
    passages: int
    max_tokens: int


def guard_edit(km: KnModel, changes: Sequence[SliceChange], limit: float | None, what: str,
               texts: Sequence[str] | None = None, measured: float | None = None) -> TextGuard:
    """Measure ``changes``' text damage; refuse (EditError, model unchanged) when it exceeds ``limit``
    (None: measured, never refused). texts: the sample (default :func:`guard_texts`); measured: the change
    already measured for exactly these changes on this sample (text_change), not measured again."""
    sample = guard_sample(texts)
    change = text_change(km, changes, sample) if measured is None else measured
    if limit is not None and not change <= limit:  # NaN (a wrecked model) is refused too
        raise EditError(f"the edit of {what} would change perplexity on the guard's text sample by {100 * change:+.1f} % "
                        f"(limit {100 * limit:.1f} %, max_text_change); the model is unchanged (raise the limit or "
                        "set max_text_change=null to apply it anyway)")
    return TextGuard(change, limit, len(sample), GUARD_TOKENS)
