"""Per-model memory of results that depend on the model's weights alone (the text guard's NLL of the unedited
model, the generic prompts' activations), so that an editor does not recompute them for every edit and trial.

Entries live on the model object (no module-level cache) and are keyed by the weights' state
(:meth:`kn_edit.editing.ledger.Ledger.state`): an edit applied or reverted, a patch loaded or any other in-place
write gives another state, so a stale entry is never read; a trial edit applied and reverted leaves the state,
and its entries, as they were. Values are shared between callers: treat them as read-only.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import TYPE_CHECKING, Callable, Hashable, TypeVar

from .ledger import weights_state

if TYPE_CHECKING:
    from ..models.model import KnModel

_ATTR = "_kn_edit_memo"
# Entries kept per kind (the most recently used): enough for a few weight states or prompt sets in turn, while a
# long sequence of edits (a new state each) does not pile up memory.
_PER_KIND = 4

T = TypeVar("T")



def memoized(km: KnModel, kind: str, key: Hashable, compute: Callable[[], T], keep: int = _PER_KIND) -> T:
    """``compute()`` for ``key`` under ``km``'s current weights, computed once per weight state and key; the
    ``keep`` most recently used entries of this ``kind`` are kept."""
    store: OrderedDict = km.model.__dict__.setdefault(_ATTR, {}).setdefault(kind, OrderedDict())
    full = (key, weights_state(km))
    if full in store:
        store.move_to_end(full)
        return store[full]
    value = compute()
    store[full] = value
    while len(store) > keep:
        store.popitem(last=False)
    return value
