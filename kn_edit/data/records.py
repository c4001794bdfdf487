"""The common fact record every data set is read into."""

from __future__ import annotations

from dataclasses import dataclass


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
