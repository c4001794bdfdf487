"""Activation of a fact's knowledge neurons by prompt type (the paper's second finding).

For each fact, the mean activation over its neurons is taken on texts of four groups:

* ``own``: the fact's own prompts, at the answer position;
* ``same_relation``: prompts of other facts of the same relation (up to ``others`` facts, seeded), answer position;
* ``other_relation``: prompts of facts of other relations (up to ``others`` facts, seeded), answer position;
* ``wiki``: corpus sentences that mention the subject (whole word, same case; the first ``sentences`` of them):
  these have no answer position, so their value is the *peak* over their tokens (as in the top-text scan), which
  is not directly comparable with the answer-position groups.

Measure (``measure``): ``"raw"``, the activation itself (the paper's, on BERT's GELU neurons, mostly positive);
or ``"oriented"`` (default), each neuron's activation times the sign of its mean activation on the fact's own
prompts. Gated (SwiGLU) FFNs such as Llama's have signed activations, and integrated gradients credits a neuron
whose negative activation raises the answer as much as a positive one; the raw mean then mixes neurons pushing
in opposite directions and is dominated by a few large-magnitude ones. Orienting by the own prompts favours the
own group slightly for neurons whose own activation is near zero; the raw numbers are reported beside it.

Per group: count, mean, spread (sample sd), quartiles; the difference of means own − other_relation with a
percentile bootstrap interval (groups resampled independently, seeded); per relation and over the data set.
"""

from __future__ import annotations

import random
import re
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Sequence

import numpy as np
import torch

from ..errors import ConfigError, DataError
from ..models.neurons import Neuron, check_neurons
from ..models.prompts import AnswerStep, encode_prompt_only
from .located import LocatedFact

if TYPE_CHECKING:
    from ..models.model import KnModel

GROUPS = ("own", "same_relation", "other_relation", "wiki")


@dataclass(frozen=True)
class GroupStats:
    n: int
    mean: float
    std: float
    q25: float
    median: float
    q75: float

    @classmethod
    def of(cls, values: Sequence[float]) -> "GroupStats":
        if not values:
            nan = float("nan")
            return cls(0, nan, nan, nan, nan, nan)
        arr = np.asarray(values, dtype=np.float64)
        q25, med, q75 = np.quantile(arr, [0.25, 0.5, 0.75])
        return cls(len(values), float(arr.mean()), float(arr.std(ddof=1)) if len(arr) > 1 else 0.0, float(q25),
                   float(med), float(q75))  # fmt: skip


@dataclass(frozen=True)
class Difference:
    """mean(own) − mean(other_relation) and its bootstrap interval [low, high] at ``level``."""

    estimate: float
    low: float
    high: float
    level: float
    resamples: int


def bootstrap_difference(a: Sequence[float], c: Sequence[float], resamples: int = 2000, level: float = 0.95,
                         seed: int = 0) -> Difference:  # fmt: skip
    """Percentile bootstrap of mean(a) − mean(c): ``resamples`` draws of each group with replacement (all of a's
    index draws first, then all of c's, from one seeded numpy Generator)."""
    nan = float("nan")
    if not len(a) or not len(c):
        return Difference(nan, nan, nan, level, resamples)
    a_arr, c_arr = np.asarray(a, dtype=np.float64), np.asarray(c, dtype=np.float64)
    rng = np.random.default_rng(seed)
    ia = rng.integers(0, len(a_arr), size=(resamples, len(a_arr)))
    ic = rng.integers(0, len(c_arr), size=(resamples, len(c_arr)))
    diffs = a_arr[ia].mean(axis=1) - c_arr[ic].mean(axis=1)
    low, high = np.quantile(diffs, [(1 - level) / 2, (1 + level) / 2])
    return Difference(float(a_arr.mean() - c_arr.mean()), float(low), float(high), level, resamples)


@dataclass
class Summary:
    groups: dict[str, GroupStats]
    own_minus_other: Difference

    def to_dict(self) -> dict:
        return {"groups": {g: asdict(s) for g, s in self.groups.items()}, "own_minus_other": asdict(self.own_minus_other)}


@dataclass
class ActivationResult:
    per_fact: list[dict]  # fact_id, relation, subject, neurons, values {group: [per text]}, texts {group: [...]}
    per_relation: dict[str, Summary]
    overall: Summary
    skipped: list[str]  # facts without neurons
    settings: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"settings": self.settings, "overall": self.overall.to_dict(),
                "per_relation": {r: s.to_dict() for r, s in self.per_relation.items()}, "skipped": self.skipped,
                "per_fact": self.per_fact}  # fmt: skip


def _columns(neurons: Sequence[Neuron]) -> tuple[list[int], dict[Neuron, tuple[int, int]]]:
    layers = sorted({n.layer for n in neurons})
    row = {l: r for r, l in enumerate(layers)}
    return layers, {n: (row[n.layer], n.index) for n in neurons}


def prompt_activations(km: KnModel, prompts: Sequence[str], neurons: Sequence[Neuron],
                       batch_size: int = 64) -> torch.Tensor:
    """[n_prompts, n_neurons]: each neuron's activation at each prompt's answer position."""
    neurons = check_neurons(neurons, km.n_layers, km.d_ff) if neurons else []
    layers, where = _columns(neurons)
    out = []
    for start in range(0, len(prompts), batch_size):
        steps = []
        for p in prompts[start : start + batch_size]:
            ids, pos = encode_prompt_only(km.tokenizer, p, km.is_masked_lm)
            steps.append(AnswerStep(ids, pos, -1))
        acts = km.activations(steps, layers)  # [batch, len(layers), d_ff]
        out.append(torch.stack([acts[:, r, i] for r, i in (where[n] for n in neurons)], dim=1))
    return torch.cat(out) if out else torch.empty(0, len(neurons))


def peak_activations(km: KnModel, texts: Sequence[str], neurons: Sequence[Neuron], batch_size: int = 32,
                     max_tokens: int = 128) -> torch.Tensor:  # fmt: skip
    """[n_texts, n_neurons]: each neuron's peak activation over each text's tokens."""
    from .top_text import _encode, scan_scores

    neurons = sorted(set(neurons))
    out = []
    for start in range(0, len(texts), batch_size):
        ids, mask, _ = _encode(km, texts[start : start + batch_size], max_tokens)
        out.append(scan_scores(km, ids, mask, neurons)[0].t())
    return torch.cat(out) if out else torch.empty(0, len(neurons))


def mentioning(sentences: Sequence[str], subject: str, limit: int) -> list[str]:
    """The first ``limit`` sentences that contain ``subject`` as a whole word (same case)."""
    pattern = re.compile(r"(?<!\w)" + re.escape(subject) + r"(?!\w)")
    out = []
    for s in sentences:
        if pattern.search(s):
            out.append(s)
            if len(out) == limit:
                break
    return out


def _pick(pool: Sequence[LocatedFact], k: int, rng: random.Random) -> list[LocatedFact]:
    return rng.sample(list(pool), min(k, len(pool)))


def activation_by_prompt_type(
    km: KnModel,
    facts: Sequence[LocatedFact],
    sentences: Sequence[str] | None = None,
    others: int = 5,
    prompts_per_other: int = 2,
    per_fact_sentences: int = 10,
    resamples: int = 2000,
    seed: int = 0,
    batch_size: int = 64,
    pool: Sequence | None = None,
    measure: str = "oriented",
) -> ActivationResult:
    """Activation of each fact's neurons on the four groups of texts (see the module docstring). The same- and
    other-relation prompts are drawn from ``pool`` (anything with ``fact_id``, ``relation``, ``prompts``, e.g. the
    FactRecords of a whole data set; their neurons are not needed), by default from ``facts`` themselves."""
    if measure not in ("raw", "oriented"):
        raise ConfigError(f"measure must be raw or oriented, got {measure!r}")
    if others < 1 or prompts_per_other < 1 or per_fact_sentences < 0 or resamples < 1:
        raise ConfigError("others, prompts per other fact and resamples must be at least 1")
    if not facts:
        raise DataError("no located facts")
    for f in facts:
        check_neurons(f.neurons, km.n_layers, km.d_ff)
    with_neurons = [f for f in facts if f.neurons]
    skipped = [f.fact_id for f in facts if not f.neurons]
    if not with_neurons:
        raise DataError("none of the facts has knowledge neurons")
    pool = list(facts) if pool is None else list(pool)
    texts: list[dict[str, list[str]]] = []
    for f in with_neurons:
        same = [g for g in pool if g.relation == f.relation and g.fact_id != f.fact_id]
        other = [g for g in pool if g.relation != f.relation]
        rng = random.Random(f"{seed}:{f.fact_id}:others")
        groups = {
            "own": list(f.prompts),
            "same_relation": [p for g in _pick(same, others, rng) for p in g.prompts[:prompts_per_other]],
            "other_relation": [p for g in _pick(other, others, rng) for p in g.prompts[:prompts_per_other]],
            "wiki": mentioning(sentences, f.subject, per_fact_sentences) if sentences and f.subject else [],
        }
        texts.append(groups)
    union = sorted({n for f in with_neurons for n in f.neurons})
    col = {n: i for i, n in enumerate(union)}
    prompts = sorted({p for t in texts for g in GROUPS[:3] for p in t[g]})
    wiki = sorted({s for t in texts for s in t["wiki"]})
    prompt_acts = dict(zip(prompts, prompt_activations(km, prompts, union, batch_size)))
    wiki_acts = dict(zip(wiki, peak_activations(km, wiki, union))) if wiki else {}
    per_fact = []
    for f, groups in zip(with_neurons, texts):
        cols = torch.tensor([col[n] for n in sorted(set(f.neurons))])
        own = torch.stack([prompt_acts[t][cols] for t in groups["own"]])  # [own prompts, neurons]
        sign = torch.where(own.mean(dim=0) < 0, -1.0, 1.0) if measure == "oriented" else torch.ones(len(cols))
        values = {}
        for g in GROUPS:
            source = wiki_acts if g == "wiki" else prompt_acts
            values[g] = [float((source[t][cols] * sign).mean()) for t in groups[g]]
        per_fact.append({"fact_id": f.fact_id, "relation": f.relation, "subject": f.subject, "target": f.target,
                         "neurons": [str(n) for n in sorted(set(f.neurons))], "signs": sign.tolist(), "values": values,
                         "texts": groups})  # fmt: skip

    def summarize(rows: list[dict]) -> Summary:
        pooled = {g: [v for r in rows for v in r["values"][g]] for g in GROUPS}
        diff = bootstrap_difference(pooled["own"], pooled["other_relation"], resamples, seed=seed)
        return Summary({g: GroupStats.of(pooled[g]) for g in GROUPS}, diff)

    relations = sorted({r["relation"] for r in per_fact})
    per_relation = {rel: summarize([r for r in per_fact if r["relation"] == rel]) for rel in relations}
    settings = {"others": others, "prompts_per_other": prompts_per_other, "per_fact_sentences": per_fact_sentences,
                "resamples": resamples, "seed": seed, "pool_facts": len(pool), "measure": measure}  # fmt: skip
    return ActivationResult(per_fact, per_relation, summarize(per_fact), skipped, settings)


def markdown(result: ActivationResult, model: str) -> str:
    measure = result.settings.get("measure", "raw")
    what = ("activation × the sign of the neuron's mean activation on the fact's own prompts" if measure == "oriented"
            else "raw activation")  # fmt: skip
    lines = [f"# Activation of knowledge neurons by prompt type ({model}, {measure})", "",
             f"Mean over a fact's neurons of the {what}; own / same relation / other relations: at the answer position; "
             "wiki: peak over the tokens of sentences mentioning the subject. n = (fact, text) pairs.", "",
             "| relation | own mean ± sd (n) | same relation | other relations | wiki sentences (peak) | own − other [95 % CI] |",
             "| --- | --- | --- | --- | --- | --- |"]  # fmt: skip

    def cell(s: GroupStats) -> str:
        return "–" if s.n == 0 else f"{s.mean:.4f} ± {s.std:.4f} ({s.n})"

    for name, summ in list(result.per_relation.items()) + [("all", result.overall)]:
        d = summ.own_minus_other
        lines.append(f"| {name} | " + " | ".join(cell(summ.groups[g]) for g in GROUPS)
                     + f" | {d.estimate:+.4f} [{d.low:+.4f}, {d.high:+.4f}] |")  # fmt: skip
    return "\n".join(lines) + "\n"
