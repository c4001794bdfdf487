"""Where knowledge neurons live: how many per fact, in which layers, and how many facts share them.

Sharing: two facts share a neuron when both located it. Counted over every unordered pair of facts of the same
relation ("within") and of different relations ("across"): the number of pairs, the share of pairs with at least
one common neuron, and the mean number of common neurons per pair.
"""

from __future__ import annotations

import statistics
from dataclasses import asdict, dataclass
from itertools import combinations
from typing import Sequence

from ..errors import DataError
from .located import LocatedFact


@dataclass(frozen=True)
class Sharing:
    pairs: int
    pairs_sharing: int
    mean_shared: float

    @property
    def share(self) -> float:
        return self.pairs_sharing / self.pairs if self.pairs else float("nan")


@dataclass(frozen=True)
class RelationCounts:
    relation: str
    n_facts: int
    mean: float
    std: float  # population spread over the relation's facts
    min: int
    max: int
    total: int


@dataclass
class Distribution:
    n_layers: int
    per_relation: list[RelationCounts]
    overall: RelationCounts
    layer_counts: list[int]  # neurons located in each layer, over all facts (a neuron counted once per fact)
    within: Sharing
    across: Sharing

    @property
    def layer_shares(self) -> list[float]:
        total = sum(self.layer_counts)
        return [c / total if total else 0.0 for c in self.layer_counts]

    def to_dict(self) -> dict:
        return {"n_layers": self.n_layers, "per_relation": [asdict(r) for r in self.per_relation],
                "overall": asdict(self.overall), "layer_counts": self.layer_counts, "layer_shares": self.layer_shares,
                "within": {**asdict(self.within), "share": self.within.share},
                "across": {**asdict(self.across), "share": self.across.share}}  # fmt: skip


def _counts(relation: str, sizes: list[int]) -> RelationCounts:
    return RelationCounts(relation, len(sizes), statistics.fmean(sizes), statistics.pstdev(sizes), min(sizes),
                          max(sizes), sum(sizes))  # fmt: skip


def distribution(facts: Sequence[LocatedFact], n_layers: int) -> Distribution:
    if not facts:
        raise DataError("no located facts")
    by_relation: dict[str, list[LocatedFact]] = {}
    for f in facts:
        by_relation.setdefault(f.relation, []).append(f)
    per_relation = [_counts(r, [len(set(f.neurons)) for f in group]) for r, group in sorted(by_relation.items())]
    layer_counts = [0] * n_layers
    for f in facts:
        for n in set(f.neurons):
            if not 0 <= n.layer < n_layers:
                raise DataError(f"fact {f.fact_id}: neuron {n} is outside the model's {n_layers} layers")
            layer_counts[n.layer] += 1
    sets = [frozenset(f.neurons) for f in facts]
    stats = {True: [0, 0, 0], False: [0, 0, 0]}  # same relation -> [pairs, pairs sharing, shared neurons]
    for i, j in combinations(range(len(facts)), 2):
        common = len(sets[i] & sets[j])
        s = stats[facts[i].relation == facts[j].relation]
        s[0] += 1
        s[1] += common > 0
        s[2] += common

    def sharing(s) -> Sharing:
        return Sharing(s[0], s[1], s[2] / s[0] if s[0] else float("nan"))

    overall = _counts("all", [len(s) for s in sets])
    return Distribution(n_layers, per_relation, overall, layer_counts, sharing(stats[True]), sharing(stats[False]))


def markdown(d: Distribution, model: str) -> str:
    lines = [f"# Knowledge-neuron distribution ({model})", "",
             "| relation | facts | neurons/fact mean | spread (sd) | min | max |", "| --- | --- | --- | --- | --- | --- |"]
    for r in d.per_relation + [d.overall]:
        lines.append(f"| {r.relation} | {r.n_facts} | {r.mean:.2f} | {r.std:.2f} | {r.min} | {r.max} |")
    lines += ["", "| layer | neurons | share |", "| --- | --- | --- |"]
    lines += [f"| {l} | {c} | {s:.3f} |" for l, (c, s) in enumerate(zip(d.layer_counts, d.layer_shares))]
    lines += ["", "| fact pairs | pairs | sharing ≥ 1 neuron | share | mean shared neurons |", "| --- | --- | --- | --- | --- |"]
    for name, s in (("same relation", d.within), ("different relations", d.across)):
        lines.append(f"| {name} | {s.pairs} | {s.pairs_sharing} | {s.share:.3f} | {s.mean_shared:.3f} |")
    return "\n".join(lines) + "\n"
