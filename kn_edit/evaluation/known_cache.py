"""Which facts a model answers right, kept on disk between runs.

The top-1 check that picks the facts to edit is the slowest part of setting up an evaluation on a CPU (about two
ParaRel facts a second per core on smollm2-135m, and a 100-fact selection checks thousands), and every run over
the same data repeats it: each method of a comparison split over parallel processes, a resumed run, the join.
The flags are a pure function of the model's weights and the fact's prompts and object, so they are kept in one
JSON file per model under ``$KN_EDIT_CACHE/known``, named by a digest of every parameter.

Concurrent runs may write the same file: each write merges with what is on disk and replaces the file
atomically, so a reader never sees a torn file and the worst case of a race is a flag computed twice.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Sequence


from ..data.records import FactRecord
from ..errors import KnEditError
from ..storage.digest import weights_digest
from ..storage.atomic import atomic_file

if TYPE_CHECKING:
    from ..models.model import KnModel

log = logging.getLogger(__name__)

# Bump when the top-1 rule (kn_edit.data.requests.known_mask) changes meaning.
RULE_VERSION = 1


def parameters_digest(km: KnModel) -> str:
    """sha256 over the name, dtype, shape and bytes of every parameter and buffer of the model (~1 s for 135M)."""
    return weights_digest(list(km.model.named_parameters()) + list(km.model.named_buffers()))


def fact_key(record: FactRecord, min_share: float) -> str:
    payload = json.dumps([RULE_VERSION, list(record.prompts), record.object, float(min_share)], ensure_ascii=False)
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()[:32]


class KnownCache:
    """{fact key: known} of one model, in ``root/<parameters digest>.json``."""

    def __init__(self, km: KnModel, root: str | Path) -> None:
        self.path = Path(root).expanduser() / f"{parameters_digest(km)}.json"
        self.flags: dict[str, bool] = self._read()

    def _read(self) -> dict[str, bool]:
        try:
            payload = json.loads(self.path.read_text())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:  # a damaged cache is recomputed, never trusted
            log.warning("ignoring the unreadable known-fact cache %s (%s)", self.path, exc)
            return {}
        flags = payload.get("flags") if isinstance(payload, dict) else None
        if not isinstance(flags, dict):
            return {}
        return {k: v for k, v in flags.items() if isinstance(k, str) and isinstance(v, bool)}

    def lookup(self, records: Sequence[FactRecord], min_share: float) -> list[bool | None]:
        return [self.flags.get(fact_key(r, min_share)) for r in records]

    def store(self, records: Sequence[FactRecord], flags: Sequence[bool], min_share: float) -> None:
        if not records:
            return
        new = {fact_key(r, min_share): bool(f) for r, f in zip(records, flags)}
        merged = {**self._read(), **self.flags, **new}  # other processes' flags written meanwhile are kept
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with atomic_file(self.path, overwrite=True, what="known-fact cache") as tmp:
                tmp.write_text(json.dumps({"rule": RULE_VERSION, "flags": merged}))
        except (OSError, KnEditError) as exc:  # a cache that cannot be written only costs time
            log.warning("could not write the known-fact cache %s (%s)", self.path, exc)
        self.flags = merged


__all__ = ["KnownCache", "fact_key", "parameters_digest"]
