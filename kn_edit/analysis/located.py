"""Facts with their knowledge neurons, as the dataset attribution (``kn-edit locate-dataset``) writes them.

Analyses either read an existing output folder or run :func:`kn_edit.locating.dataset.locate_dataset` into the
analysis' run folder; its disk cache means facts attributed before are read, not recomputed.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

from ..errors import DataError
from ..models.neurons import Neuron

if TYPE_CHECKING:
    from ..models.model import KnModel


@dataclass(frozen=True)
class LocatedFact:
    fact_id: str
    relation: str
    subject: str | None
    target: str
    prompts: tuple[str, ...]
    neurons: tuple[Neuron, ...]

    @classmethod
    def from_entry(cls, entry: dict) -> "LocatedFact":
        try:
            neurons = tuple(Neuron(int(n["layer"]), int(n["index"])) for n in entry["neurons"])
            return cls(str(entry["fact_id"]), str(entry.get("relation", "")), entry.get("subject"), entry["target"],
                       tuple(entry["prompts"]), neurons)  # fmt: skip
        except (KeyError, TypeError, ValueError) as exc:
            raise DataError(f"malformed located fact {str(entry)[:80]}...: {exc}") from None


def read_located(folder: str | Path) -> list[LocatedFact]:
    """The facts of a ``locate-dataset`` output folder (its facts.jsonl)."""
    path = Path(folder) / "facts.jsonl"
    if not path.is_file():
        raise DataError(f"{folder} is not a locate-dataset output folder (no facts.jsonl)")
    facts = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if line.strip():
            try:
                facts.append(LocatedFact.from_entry(json.loads(line)))
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}:{number}: not JSON ({exc.msg})") from None
    if not facts:
        raise DataError(f"{path}: no facts")
    return facts


def locate_facts(km: KnModel, records: Sequence, out: str | Path, config=None, attribute_fn=None, reporter=None,
                 progress: bool = False) -> tuple[list[LocatedFact], int]:
    """Run the dataset attribution (cached) into ``out``; (located facts, prompts computed rather than read)."""
    from ..locating.dataset import locate_dataset

    result = locate_dataset(km, records, out, config, attribute_fn=attribute_fn, reporter=reporter, progress=progress)
    return read_located(out), result.computed_prompts
