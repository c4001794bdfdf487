"""The common fact record every data set is read into."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..errors import EditError


@dataclass(frozen=True)
class FactRecord:
    """One fact ⟨subject, relation, object⟩ with the prompts that express it.

    prompts: used for locating and editing (causal: text before the answer; masked: with the mask slot).
    heldout_prompts: paraphrases kept apart to measure generalization (empty where the data set has none).
    """

    fact_id: str
    subject: str
    relation: str
    object: str
    prompts: tuple[str, ...]
    heldout_prompts: tuple[str, ...] = ()

    @property
    def all_prompts(self) -> tuple[str, ...]:
        return self.prompts + self.heldout_prompts


@dataclass(frozen=True)
class SkippedFact:
    """A fact a loader or filter set aside, and why; runs count these instead of dropping facts silently."""

    fact_id: str
    relation: str
    reason: str
    detail: str = ""


@dataclass
class FactSet:
    """Facts read from one source, plus every fact that was set aside (with its reason)."""

    name: str
    records: list[FactRecord]
    skipped: list[SkippedFact] = field(default_factory=list)

    @property
    def relations(self) -> list[str]:
        return sorted({r.relation for r in self.records})

    def by_relation(self) -> dict[str, list[FactRecord]]:
        out: dict[str, list[FactRecord]] = {}
        for record in self.records:
            out.setdefault(record.relation, []).append(record)
        return out

    def skipped_counts(self) -> dict[str, int]:
        """{reason: number of facts skipped for it}."""
        counts: dict[str, int] = {}
        for s in self.skipped:
            counts[s.reason] = counts.get(s.reason, 0) + 1
        return dict(sorted(counts.items()))

    def __len__(self) -> int:
        return len(self.records)


@dataclass(frozen=True)
class EditRequest:
    """One fact to change. ``new=None`` asks to erase ``old`` (the current object) instead.

    prompts: texts that express the fact with the answer slot at the end (causal) or marked (masked LM).
    """

    prompts: tuple[str, ...]
    old: str
    new: str | None = None
    subject: str | None = None
    relation: str | None = None

    def __post_init__(self) -> None:
        if isinstance(self.prompts, str):
            object.__setattr__(self, "prompts", (self.prompts,))
        object.__setattr__(self, "prompts", tuple(self.prompts))
        if not self.prompts:
            raise EditError("an edit request needs at least one prompt")
        if not isinstance(self.old, str) or not self.old.strip():
            raise EditError("an edit request needs the current object (old)")
        if self.new is not None and self.new.strip() == self.old.strip():
            raise EditError(f"old and new are the same ({self.old!r}): nothing to edit")

    @property
    def is_erasure(self) -> bool:
        return self.new is None


# --- The field's benchmark files (CounterFact, zsRE, MQuAKE, KnowEdit) ------------------------------------------
# Every reader in ``kn_edit/data/benchmarks/`` turns one record of its file into one BenchmarkCase: the edit(s) it
# requests plus labelled sets of prompts measured around them. Metrics read the probes by ``kind``.

PROBE_KINDS = ("paraphrase", "neighborhood", "attribute", "locality", "portability", "multihop")


@dataclass(frozen=True)
class Probe:
    """Prompts measured around an edit, each answered by ``answer`` (and its aliases) when the edit works as meant.

    kind: paraphrase (other wordings of the edited fact: answer = new), neighborhood (other subjects, same relation,
    same true object: answer = the true object, which must survive), attribute (subjects whose true object is the
    new one: answer = new), locality (unrelated prompts whose answer must survive), portability (facts that follow
    from the edit: answer = the implied answer), multihop (MQuAKE chains: answer = the answer after the edits).
    contrast: the answer it competes with, for CounterFact's P(answer) > P(contrast) scores (paraphrase: the true
    object; neighborhood: the new object); None where the benchmark scores top-1 / token accuracy only.
    before: the answer the unedited model is expected to give (MQuAKE's ``answer``), for before/after accuracy.
    label: a finer criterion (KnowEdit's portability kinds: ``logical_generalization``, ``subject_aliasing``, ...).
    """

    kind: str
    prompts: tuple[str, ...]
    answer: str
    contrast: str | None = None
    aliases: tuple[str, ...] = ()
    before: str | None = None
    before_aliases: tuple[str, ...] = ()
    label: str = ""

    def __post_init__(self) -> None:
        if self.kind not in PROBE_KINDS:
            raise EditError(f"unknown probe kind {self.kind!r} (one of {', '.join(PROBE_KINDS)})")
        for name in ("prompts", "aliases", "before_aliases"):
            value = getattr(self, name)
            object.__setattr__(self, name, (value,) if isinstance(value, str) else tuple(value))


@dataclass(frozen=True)
class BenchmarkCase:
    """One record of a benchmark file: the edits it requests, and what is measured around them.

    requests: the edits, applied together (CounterFact, zsRE, KnowEdit: one; MQuAKE: one per requested rewrite).
    generation_prompts: prompts for free generation (CounterFact's generation entropy and reference score).
    reference_texts: texts about the new object that generations are compared with (CounterFact's reference
    score); empty where the file gives none.
    where: ``FILE:RECORD`` for error messages and reports.
    """

    case_id: str
    source: str  # counterfact | zsre | mquake | knowedit
    requests: tuple[EditRequest, ...]
    probes: tuple[Probe, ...] = ()
    generation_prompts: tuple[str, ...] = ()
    reference_texts: tuple[str, ...] = ()
    where: str = ""

    def probes_of(self, kind: str) -> tuple[Probe, ...]:
        return tuple(p for p in self.probes if p.kind == kind)
