"""The field's benchmark metrics (CounterFact, zsRE, KnowEdit, MQuAKE), as pure functions of per-prompt
measurements: each (prompt, target) teacher-forced gives its mean token log-probability and, per answer token,
the argmax and whether it is the token; each prompt's greedy generation gives its continuation.

A case's probes come as ``Group``s: the rewrite prompts of each edit request (kind ``rewrite``: answer = new,
contrast = the true object) and the case's probes (``data.records.Probe``). Per case each metric is computed
from its groups; a summary is the mean over cases (``summary``), so a run's per-case rows give its table.

Probability convention (ROME's official code, ``test_batch_prediction``): P(x) = exp(−mean token NLL of x's
tokens given the prompt), the target preceded by a space (kn-edit's prompt encoding joins them so).
"""

from __future__ import annotations

import math
import re
from collections import Counter
from dataclasses import dataclass, fields
from typing import Mapping, Sequence

from ..data.records import BenchmarkCase, Probe
from .fluency import ngram_entropy

BENCHMARKS = ("counterfact", "zsre", "mquake", "knowedit")


@dataclass(frozen=True)
class Group(Probe):
    """Prompts measured together: a Probe, or a request's rewrite prompts (kind ``rewrite``: answer = new,
    contrast = old)."""

    def __post_init__(self) -> None:
        if self.kind != "rewrite":
            super().__post_init__()

    def targets(self) -> tuple[str, ...]:
        """Every string teacher-forced after each prompt (each once)."""
        every = (self.answer, self.contrast, *self.aliases, self.before, *self.before_aliases)
        return tuple(dict.fromkeys(t for t in every if t is not None))


def groups_of(case: BenchmarkCase) -> list[Group]:
    """The case's rewrite groups (one per edit request) followed by its probes, in file order."""
    out = [Group("rewrite", r.prompts, r.new, r.old) for r in case.requests if r.new is not None]
    return out + [Group(**{f.name: getattr(p, f.name) for f in fields(Probe)}) for p in case.probes]


@dataclass(frozen=True)
class Measured:
    """One target after one prompt, teacher-forced: mean token log P, and per token its argmax and hit."""

    logp: float
    argmax: tuple[int, ...]
    hits: tuple[bool, ...]

    @property
    def p(self) -> float:
        return math.exp(self.logp)

    @property
    def top1(self) -> bool:
        return all(self.hits)


Key = tuple[int, int, str]  # (group index, prompt index, target)
Measures = Mapping[Key, Measured]
Generated = Mapping[tuple[int, int], str]  # (group index, prompt index) -> greedy continuation


def _mean(values: Sequence[float]) -> float | None:
    return sum(values) / len(values) if values else None


def _items(groups: Sequence[Group], kinds: Sequence[str], label: str | None = None):
    for g, group in enumerate(groups):
        if group.kind in kinds and (label is None or group.label == label):
            for i in range(len(group.prompts)):
                yield g, i, group


# ----- CounterFact (Meng et al. 2022, ROME, §3.2 / appendix C) ------------------------------------------------
def comparison(groups: Sequence[Group], after: Measures, kind: str) -> tuple[float, float] | None:
    """(score, magnitude) over the case's prompts of ``kind``: mean [P(answer) > P(contrast)] and mean
    P(answer) − P(contrast). Rewrite / paraphrase: answer = new, contrast = true (ES/EM, PS/PM); neighborhood:
    answer = true, contrast = new (NS/NM). None where the case has no such prompt."""
    pairs = [(after[(g, i, grp.answer)], after[(g, i, grp.contrast)])
             for g, i, grp in _items(groups, (kind,)) if grp.contrast is not None]  # fmt: skip
    if not pairs:
        return None
    return _mean([float(a.logp > b.logp) for a, b in pairs]), _mean([a.p - b.p for a, b in pairs])


def harmonic_mean(values: Sequence[float]) -> float:
    """ROME's S: the harmonic mean (0 where any value is 0)."""
    return 0.0 if any(v <= 0 for v in values) else len(values) / sum(1 / v for v in values)


_TFIDF_TOKEN = re.compile(r"(?u)\b\w\w+\b")  # scikit-learn's default token pattern, lower-cased text


def idf_weights(documents: Sequence[str]) -> dict[str, float]:
    """Smoothed inverse document frequencies (scikit-learn's TfidfVectorizer default):
    idf(t) = ln((1 + n) / (1 + df(t))) + 1 over the ``documents``' lower-cased words of two or more characters."""
    df = Counter(t for d in documents for t in set(_TFIDF_TOKEN.findall(d.lower())))
    n = len(documents)
    return {t: math.log((1 + n) / (1 + k)) + 1 for t, k in df.items()}


def tfidf_cosine(a: str, b: str, idf: Mapping[str, float]) -> float | None:
    """Cosine similarity of the TF-IDF vectors (raw counts × idf, words outside ``idf`` ignored) of two texts;
    None where either vector is zero (the similarity is undefined)."""
    va, vb = ({t: c * idf[t] for t, c in Counter(_TFIDF_TOKEN.findall(x.lower())).items() if t in idf} for x in (a, b))
    na, nb = math.sqrt(sum(v * v for v in va.values())), math.sqrt(sum(v * v for v in vb.values()))
    if na == 0 or nb == 0:
        return None
    return sum(v * vb.get(t, 0.0) for t, v in va.items()) / (na * nb)


def reference_score(generations: Sequence[str], references: Sequence[str], idf: Mapping[str, float]) -> float | None:
    """ROME's RS: TF-IDF cosine of the case's generations (joined) and its reference texts (joined); None when
    the case has no reference text or nothing to compare (never 0 for "missing")."""
    if not references or not generations:
        return None
    return tfidf_cosine(" ".join(generations), " ".join(references), idf)


# ----- token accuracy (zsRE in the MEND/ROME form; KnowEdit / EasyEdit, Zhang et al. 2024) -------------------
def token_accuracy(groups: Sequence[Group], measured: Measures, kinds: Sequence[str],
                   label: str | None = None) -> float | None:
    """Share of answer tokens whose teacher-forced argmax is that token, pooled over the case's prompts of
    ``kinds`` (ROME's zsRE and EasyEdit's rewrite/rephrase/portability accuracy)."""
    hits = [h for g, i, grp in _items(groups, kinds, label) for h in measured[(g, i, grp.answer)].hits]
    return _mean([float(h) for h in hits])


def argmax_agreement(groups: Sequence[Group], before: Measures, after: Measures, kinds: Sequence[str],
                     label: str | None = None) -> float | None:
    """EasyEdit's locality: share of the answer's teacher-forced positions whose argmax token is the same after
    the edit as before (whatever the answer token is)."""
    same = [a == b for g, i, grp in _items(groups, kinds, label)
            for a, b in zip(before[(g, i, grp.answer)].argmax, after[(g, i, grp.answer)].argmax)]  # fmt: skip
    return _mean([float(s) for s in same])


# ----- MQuAKE (Zhong et al. 2023) ---------------------------------------------------------------------------
def multihop_answered(groups: Sequence[Group], measured: Measures, before: bool) -> bool | None:
    """MQuAKE's multi-hop accuracy of one case: any of its questions answered (teacher-forced: every token of the
    answer or of an alias is the argmax); ``before``: the answer of the unedited model, else the new answer."""
    hits = []
    for g, i, grp in _items(groups, ("multihop",)):
        answers = (grp.before, *grp.before_aliases) if before else (grp.answer, *grp.aliases)
        hits.append(any(measured[(g, i, a)].top1 for a in answers if a is not None))
    return any(hits) if hits else None


# ----- generation-based accuracy (WILD, ACL 2025: teacher forcing overstates edits) --------------------------
def generation_correct(continuation: str, answers: Sequence[str]) -> bool:
    """The greedy continuation starts (leading spaces stripped, case ignored) with an answer or alias."""
    text = continuation.lstrip().lower()
    return any(a.strip() and text.startswith(a.strip().lower()) for a in answers)


def generation_accuracy(groups: Sequence[Group], generated: Generated, kind: str, before: bool = False) -> float | None:
    """Share of the case's prompts of ``kind`` whose generation is right (multihop: 1 when any question is)."""
    flags = []
    for g, i, grp in _items(groups, (kind,)):
        answers = (grp.before, *grp.before_aliases) if before else (grp.answer, *grp.aliases)
        flags.append(generation_correct(generated[(g, i)], [a for a in answers if a is not None]))
    if not flags:
        return None
    return float(any(flags)) if kind == "multihop" else _mean([float(f) for f in flags])


# ----- one case, and the summary of a run --------------------------------------------------------------------
def case_scores(source: str, groups: Sequence[Group], before: Measures, after: Measures,
                generations_after: Sequence[str] = (), references: Sequence[str] = (),
                idf: Mapping[str, float] | None = None, gen_before: Generated | None = None,
                gen_after: Generated | None = None) -> dict[str, float]:
    """The benchmark's metrics for one case (keys without the source prefix; a metric the case cannot give is
    left out). ``generations_after``: its free generations after the edit (GE, RS; empty: not measured);
    ``gen_before``/``gen_after``: the greedy continuations of every probe prompt (generation-based accuracy)."""
    out: dict[str, float | None] = {}
    if source == "counterfact":
        for kind, (score, magnitude) in (("rewrite", ("ES", "EM")), ("paraphrase", ("PS", "PM")),
                                         ("neighborhood", ("NS", "NM"))):  # fmt: skip
            value = comparison(groups, after, kind)
            if value is not None:
                out[score], out[magnitude] = value
        if generations_after:
            out["GE"] = ngram_entropy(list(generations_after))
            out["RS"] = reference_score(generations_after, references, idf or {})
    elif source == "zsre":
        out["efficacy"] = token_accuracy(groups, after, ("rewrite",))
        out["paraphrase"] = token_accuracy(groups, after, ("paraphrase",))
        out["specificity"] = token_accuracy(groups, after, ("locality", "neighborhood"))
    elif source == "knowedit":
        out["Reliability"] = token_accuracy(groups, after, ("rewrite",))
        out["Generalization"] = token_accuracy(groups, after, ("paraphrase",))
        out["Locality"] = argmax_agreement(groups, before, after, ("locality",))
        out["Portability"] = token_accuracy(groups, after, ("portability",))
        for label in sorted({g.label for g in groups if g.label and g.kind in ("locality", "portability")}):
            out[f"Locality/{label}"] = argmax_agreement(groups, before, after, ("locality",), label)
            out[f"Portability/{label}"] = token_accuracy(groups, after, ("portability",), label)
    elif source == "mquake":
        for name, which, measured in (("multihop_before", True, before), ("multihop_after", False, after)):
            answered = multihop_answered(groups, measured, which)
            out[name] = None if answered is None else float(answered)
    else:
        raise ValueError(f"unknown benchmark {source!r} (one of {', '.join(BENCHMARKS)})")
    if gen_after is not None:
        for kind in dict.fromkeys(g.kind for g in groups):
            if kind == "multihop" and gen_before is not None:
                out["gen/multihop_before"] = generation_accuracy(groups, gen_before, kind, before=True)
            out[f"gen/{kind}" + ("_after" if kind == "multihop" else "")] = generation_accuracy(groups, gen_after, kind)
    return {k: float(v) for k, v in out.items() if v is not None}


def summary(rows: Sequence[Mapping]) -> dict[str, float]:
    """``SOURCE/METRIC`` → mean over the rows (cases) that have the metric (``row["benchmark"]["scores"]``);
    CounterFact's S = harmonic mean of ES, PS and NS. A metric no case gives is absent (reported as missing)."""
    values: dict[str, list[float]] = {}
    for row in rows:
        bench = row.get("benchmark")
        if bench:
            for key, value in bench["scores"].items():
                values.setdefault(f"{bench['source']}/{key}", []).append(value)
    out = {k: sum(v) / len(v) for k, v in sorted(values.items())}
    if all(f"counterfact/{k}" in out for k in ("ES", "PS", "NS")):
        out["counterfact/S"] = harmonic_mean([out[f"counterfact/{k}"] for k in ("ES", "PS", "NS")])
    return out


# The paper's columns of each benchmark (metric key without the source, column title), in the paper's order.
TABLES = {
    "counterfact": (("S", "S"), ("ES", "ES"), ("PS", "PS"), ("NS", "NS"), ("EM", "EM"), ("PM", "PM"),
                    ("NM", "NM"), ("GE", "GE"), ("RS", "RS")),
    "zsre": (("efficacy", "efficacy"), ("paraphrase", "paraphrase"), ("specificity", "specificity")),
    "knowedit": (("Reliability", "Reliability"), ("Generalization", "Generalization"), ("Locality", "Locality"),
                 ("Portability", "Portability")),
    "mquake": (("multihop_before", "multi-hop before"), ("multihop_after", "multi-hop after")),
}  # fmt: skip


def table_columns(metrics: Mapping[str, float]) -> list[tuple[str, str]]:
    """(metric key, column title) of the benchmark tables the metrics hold: the paper's columns (every one,
    missing ones included), then per-label and generation-based columns present."""
    out = []
    for source, columns in TABLES.items():
        if any(k.startswith(f"{source}/") for k in metrics):
            out += [(f"{source}/{k}", title) for k, title in columns]
            named = {k for k, _ in out}
            out += [(k, k.split("/", 1)[1]) for k in sorted(metrics) if k.startswith(f"{source}/") and k not in named]
    return out


__all__ = ["BENCHMARKS", "Group", "Measured", "TABLES", "argmax_agreement", "case_scores", "comparison",
           "generation_accuracy", "generation_correct", "groups_of", "harmonic_mean", "idf_weights",
           "multihop_answered", "reference_score", "summary", "table_columns", "tfidf_cosine", "token_accuracy"]
