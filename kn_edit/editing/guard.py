"""The text-damage guard: an edit's relative change of perplexity on a small fixed text sample, measured with
the edit applied as a trial (reverted before returning) and bounded by a limit.

The sample: the first ``n`` passages of the Wikipedia key slice (kn_edit/data/text.py), each cut at
``max_tokens`` tokens; disjoint from the held-out passages evaluation measures perplexity on. A few hundred
tokens: one batched forward before and one after, well under a second on smollm2-135m (CPU). The unedited
model's NLL is computed once per weight state (kn_edit.editing.memo), not for every edit and trial.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING, Sequence


from ..errors import EditError, KnEditError
from ..models.likelihood import mean_text_nll
from .ledger import SliceChange, commit
from .memo import memoized

if TYPE_CHECKING:
    from ..models.model import KnModel

GUARD_PASSAGES = 8
GUARD_TOKENS = 48


@lru_cache(maxsize=4)
def guard_texts(n: int = GUARD_PASSAGES) -> tuple[str, ...]:
    """The fixed sample: the first ``n`` passages of the Wikipedia key slice (read once per process)."""
    from ..data.text import wiki_key_passages

    return tuple(wiki_key_passages()[:n])


def guard_sample(texts: Sequence[str] | None = None) -> tuple[str, ...]:
    """The guard's sample: ``texts`` where given, else the fixed Wikipedia sample (:func:`guard_texts`)."""
    return tuple(texts) if texts is not None else guard_texts()


def text_nll(km: KnModel, texts: Sequence[str], max_tokens: int = GUARD_TOKENS) -> float:
    """Mean per-token negative log-likelihood of ``texts`` (each cut at ``max_tokens`` tokens), one batch."""
    try:
        return mean_text_nll(km, texts, max_tokens)
    except KnEditError as exc:
        raise EditError(f"the text-damage guard's sample: {exc}") from None


def text_change(km: KnModel, changes: Sequence[SliceChange], texts: Sequence[str],
                max_tokens: int = GUARD_TOKENS) -> float:
    """Relative perplexity change exp(NLL_after − NLL_before) − 1 of ``texts`` under ``changes`` (applied as a
    trial and reverted; the model is as before when this returns or raises)."""
    texts = tuple(texts)
    before = memoized(km, "guard_nll", (texts, max_tokens), lambda: text_nll(km, texts, max_tokens))
    trial = commit(km, "trial", [], list(changes))
    try:
        after = text_nll(km, texts, max_tokens)
    finally:
        trial.revert()
    return math.expm1(after - before)


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
