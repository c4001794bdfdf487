"""Activation by prompt type and the distribution, against plain recomputations."""

from __future__ import annotations

import json
import statistics

import numpy as np
import pytest
import torch

from kn_edit.analysis.activations import activation_by_prompt_type, bootstrap_difference, mentioning
from kn_edit.analysis.distribution import distribution
from kn_edit.analysis.located import LocatedFact, read_located
from kn_edit.errors import DataError, KnEditError
from kn_edit.models.neurons import Neuron
from tiny_models import CORPUS

FACTS = [
    LocatedFact("f1", "capital", "France", "Paris", ("The capital of France is", "France's capital is"), (Neuron(1, 3), Neuron(0, 9))),
    LocatedFact("f2", "capital", "Italy", "Rome", ("The capital of Italy is", "Italy's capital is"), (Neuron(1, 3),)),
    LocatedFact("f3", "capital", "Japan", "Tokyo", ("The capital of Japan is",), (Neuron(1, 20),)),
    LocatedFact("f4", "birth", "Danielle Darrieux", "Bordeaux", ("Danielle Darrieux was born in",), (Neuron(0, 5), Neuron(1, 6))),
    LocatedFact("f5", "language", "France", "French", ("The official language of France is",), ()),
]


def plain_activation(km, text: str, neurons, answer: bool, signs=None) -> float:
    """Mean over ``neurons`` of the value-projection input (times ``signs``): at the last token (answer) or its
    peak over tokens."""
    ids = torch.tensor([km.tokenizer(text)["input_ids"]])
    seen = {}
    handles = [km.value_proj(l).register_forward_pre_hook(lambda _m, a, l=l: seen.__setitem__(l, a[0][0].clone()))
               for l in range(km.n_layers)]
    with torch.no_grad():
        km.model(input_ids=ids)
    for h in handles:
        h.remove()
    vals = [float(seen[n.layer][-1, n.index]) if answer else float(seen[n.layer][:, n.index].max()) for n in neurons]
    signs = signs or [1.0] * len(vals)
    return sum(v * s for v, s in zip(vals, signs)) / len(vals)


def plain_signs(km, prompts, neurons) -> list[float]:
    """Per neuron: -1 where its mean activation over ``prompts`` is negative, else +1."""
    per = [[plain_activation(km, p, [n], answer=True) for p in prompts] for n in neurons]
    return [-1.0 if sum(v) / len(v) < 0 else 1.0 for v in per]


@pytest.mark.parametrize("measure", ["oriented", "raw"])
def test_activation_by_prompt_type_equals_plain_recomputation(tiny_factory, measure):
    km = tiny_factory("llama", n_layers=2)
    result = activation_by_prompt_type(km, FACTS, CORPUS, others=2, prompts_per_other=1, per_fact_sentences=3,
                                       resamples=200, seed=3, measure=measure)
    assert result.skipped == ["f5"] and len(result.per_fact) == 4
    for row, fact in zip(result.per_fact, FACTS):
        neurons = sorted(set(fact.neurons))
        assert row["texts"]["own"] == list(fact.prompts)
        assert len(row["texts"]["same_relation"]) == (2 if fact.relation == "capital" else 0)
        assert all(t in {p for f in FACTS if f.relation != fact.relation for p in f.prompts[:1]}
                   for t in row["texts"]["other_relation"])
        assert row["texts"]["wiki"] == [s for s in CORPUS if fact.subject in s.replace(",", " ").split()
                                        or fact.subject in s][:3]
        signs = plain_signs(km, fact.prompts, neurons) if measure == "oriented" else None
        assert row["signs"] == (signs or [1.0] * len(neurons))
        for group, texts in row["texts"].items():
            expected = [plain_activation(km, t, neurons, answer=group != "wiki", signs=signs) for t in texts]
            assert row["values"][group] == pytest.approx(expected, abs=1e-5), group
    pooled = [v for r in result.per_fact for v in r["values"]["own"]]
    own = result.overall.groups["own"]
    assert own.n == len(pooled) and own.mean == pytest.approx(statistics.fmean(pooled))
    assert own.std == pytest.approx(statistics.stdev(pooled))
    assert own.median == pytest.approx(statistics.median(pooled))
    cap = [v for r in result.per_fact if r["relation"] == "capital" for v in r["values"]["same_relation"]]
    assert result.per_relation["capital"].groups["same_relation"].mean == pytest.approx(statistics.fmean(cap))
    other = [v for r in result.per_fact for v in r["values"]["other_relation"]]
    diff = result.overall.own_minus_other
    assert diff.estimate == pytest.approx(statistics.fmean(pooled) - statistics.fmean(other))
    assert diff.low <= diff.estimate <= diff.high
    # Seeded: the same run gives the same numbers.
    again = activation_by_prompt_type(km, FACTS, CORPUS, others=2, prompts_per_other=1, per_fact_sentences=3,
                                      resamples=200, seed=3, measure=measure)
    assert json.dumps(again.to_dict(), sort_keys=True) == json.dumps(result.to_dict(), sort_keys=True)  # NaN-safe


def test_bootstrap_equals_a_plain_loop():
    a, c = [0.5, 1.0, 2.0, 2.5, 3.0], [0.1, 0.4, 0.2, 0.9]
    got = bootstrap_difference(a, c, resamples=500, level=0.9, seed=7)
    rng = np.random.default_rng(7)
    ia = [rng.integers(0, len(a), size=len(a)) for _ in range(500)]
    ic = [rng.integers(0, len(c), size=len(c)) for _ in range(500)]
    diffs = sorted(sum(a[i] for i in x) / len(a) - sum(c[i] for i in y) / len(c) for x, y in zip(ia, ic))
    # numpy's default (linear) quantile, written out.
    def q(p):
        h = (len(diffs) - 1) * p
        lo = int(h)
        return diffs[lo] + (h - lo) * (diffs[min(lo + 1, len(diffs) - 1)] - diffs[lo])
    assert got.estimate == pytest.approx(1.8 - 0.4)
    assert got.low == pytest.approx(q(0.05)) and got.high == pytest.approx(q(0.95))


def test_mentioning_is_whole_word_and_case_sensitive():
    sentences = ["Francesca went home.", "France is big.", "In france, too.", "Visit France!"]
    assert mentioning(sentences, "France", 5) == ["France is big.", "Visit France!"]
    assert mentioning(sentences, "France", 1) == ["France is big."]


def test_activation_errors(tiny_factory):
    km = tiny_factory("llama", n_layers=2)
    bad = [LocatedFact("x", "r", "s", "t", ("The capital of France is",), (Neuron(5, 0),))]
    with pytest.raises(KnEditError, match="does not exist"):
        activation_by_prompt_type(km, bad)
    with pytest.raises(DataError, match="none of the facts"):
        activation_by_prompt_type(km, [FACTS[4]])


def test_distribution_counts_by_hand():
    facts = [
        LocatedFact("a", "r1", "A", "x", ("p",), (Neuron(0, 1), Neuron(1, 2))),
        LocatedFact("b", "r1", "B", "x", ("p",), (Neuron(1, 2),)),
        LocatedFact("c", "r2", "C", "x", ("p",), (Neuron(0, 1), Neuron(1, 3), Neuron(1, 3))),
        LocatedFact("d", "r2", "D", "x", ("p",), ()),
    ]
    d = distribution(facts, n_layers=3)
    r1, r2 = d.per_relation
    assert (r1.relation, r1.n_facts, r1.mean, r1.min, r1.max) == ("r1", 2, 1.5, 1, 2)
    assert (r2.mean, r2.std, r2.total) == (1.0, 1.0, 2)  # duplicates counted once
    assert d.layer_counts == [2, 3, 0] and d.layer_shares == pytest.approx([0.4, 0.6, 0.0])
    # Same relation: (a,b) share 1:2; (c,d) nothing. Different: (a,c) share 0:1; (a,d), (b,c), (b,d) nothing.
    assert (d.within.pairs, d.within.pairs_sharing, d.within.mean_shared) == (2, 1, 0.5)
    assert (d.across.pairs, d.across.pairs_sharing, d.across.mean_shared) == (4, 1, 0.25)
    assert d.within.share == 0.5 and d.across.share == 0.25
    with pytest.raises(DataError, match="outside"):
        distribution(facts, n_layers=1)


def test_read_located_errors(tmp_path):
    with pytest.raises(DataError, match="no facts.jsonl"):
        read_located(tmp_path)
    (tmp_path / "facts.jsonl").write_text(json.dumps({"fact_id": "x"}) + "\n")
    with pytest.raises(DataError, match="malformed"):
        read_located(tmp_path)


def test_other_prompts_can_come_from_a_data_set_pool(tiny_factory):
    from kn_edit.data import FactRecord

    km = tiny_factory("llama", n_layers=2)
    pool = [FactRecord("p1", "Spain", "capital", "Madrid", ("The capital of Spain is",)),
            FactRecord("p2", "Germany", "capital", "Berlin", ("Berlin is the capital of",)),
            FactRecord("p3", "Dante", "language", "Italian", ("The mother tongue of Dante is",))]
    result = activation_by_prompt_type(km, FACTS[:1], others=5, prompts_per_other=1, resamples=10, pool=pool, measure="raw")
    texts = result.per_fact[0]["texts"]
    assert sorted(texts["same_relation"]) == ["Berlin is the capital of", "The capital of Spain is"]
    assert texts["other_relation"] == ["The mother tongue of Dante is"]
    assert result.per_fact[0]["values"]["other_relation"] == pytest.approx(
        [plain_activation(km, "The mother tongue of Dante is", sorted(FACTS[0].neurons), answer=True)], abs=1e-5)
