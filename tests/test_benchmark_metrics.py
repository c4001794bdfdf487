"""The field's benchmark metrics (CounterFact, zsRE, KnowEdit, MQuAKE, generation-based accuracy) against plain
recomputations: per-prompt probabilities and argmaxes by a slow one-sequence-at-a-time loop on tiny models, and
each metric's formula written out plainly from them."""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import replace

import pytest
import torch

from helpers import benchmark_cases
from kn_edit.evaluation.benchmark import generate, measure
from kn_edit.evaluation.benchmark_metrics import (Group, Measured, case_scores, generation_correct, groups_of,
                                                  harmonic_mean, idf_weights, multihop_answered, summary,
                                                  tfidf_cosine)  # fmt: skip
from kn_edit.evaluation.fluency import ngram_entropy


def plain_measure(km, prompt: str, target: str) -> tuple[float, list[int], list[int]]:
    """(mean token log P, argmax per token, target ids) of ``target`` after ``prompt``: one forward of the whole
    sequence, position by position."""
    enc = km.encode(prompt, target)
    full = torch.cat([enc.steps[-1].input_ids, torch.tensor([enc.target_ids[-1]])])
    with torch.no_grad():
        logits = km.model(input_ids=full[None]).logits[0].float()
    logp, argmax = [], []
    for step in enc.steps:
        row = torch.log_softmax(logits[step.position], dim=-1)
        logp.append(float(row[step.target_id]))
        argmax.append(int(row.argmax()))
    return sum(logp) / len(logp), argmax, list(enc.target_ids)


def plain_greedy(km, prompt: str, n: int) -> str:
    ids = km.tokenizer(prompt.rstrip(), add_special_tokens=True)["input_ids"]
    out = []
    for _ in range(n):
        with torch.no_grad():
            nxt = int(km.model(input_ids=torch.tensor([ids + out])).logits[0, -1].argmax())
        if nxt == km.tokenizer.eos_token_id:
            break
        out.append(nxt)
    return km.tokenizer.decode(out)


def answered_by(km, case, before_km=None):
    """The case with answers the model (partly) gives, so accuracies are not all 0 on a random model: every other
    probe's answer, and the request's new object, become the model's own greedy continuation; a multihop probe
    gets it as an alias (and ``before_km``'s as a before-alias)."""
    own = lambda model, prompt: plain_greedy(model, prompt, 3).strip() or "x"  # noqa: E731
    probes = []
    for j, p in enumerate(case.probes):
        if p.kind == "multihop":
            p = replace(p, aliases=(*p.aliases, own(km, p.prompts[-1])),
                        before_aliases=(*p.before_aliases, own(before_km or km, p.prompts[0])))
        elif j % 2 == 0:
            p = replace(p, answer=own(km, p.prompts[0]))
        probes.append(p)
    r = case.requests[0]
    new = own(km, r.prompts[0])
    requests = (replace(r, new=new if new != r.old else r.new), *case.requests[1:])
    return replace(case, case_id=case.case_id + "-own", requests=requests, probes=tuple(probes))


def _mean(xs):
    return sum(xs) / len(xs)


@pytest.fixture(params=["llama", "gpt2"])
def two_models(request, tiny_factory):
    """(before, after): two tiny models of a family that differ (seeds 0 and 1) and share the tokenizer."""
    return tiny_factory(request.param, seed=0), tiny_factory(request.param, seed=1)


def test_measure_equals_a_plain_forward(two_models):
    km = two_models[0]
    for cases in benchmark_cases().values():
        for case in cases:
            groups = groups_of(case)
            measured = measure(km, groups, batch_size=3)
            for g, group in enumerate(groups):
                for i, prompt in enumerate(group.prompts):
                    for target in group.targets():
                        logp, argmax, ids = plain_measure(km, prompt, target)
                        m = measured[(g, i, target)]
                        assert m.logp == pytest.approx(logp, abs=1e-5)
                        assert list(m.argmax) == argmax and list(m.hits) == [a == t for a, t in zip(argmax, ids)]


def test_counterfact_scores_and_magnitudes_equal_a_plain_recomputation(two_models):
    before_km, km = two_models
    cases = benchmark_cases()["counterfact"]
    rows = []
    plain: dict[str, list[float]] = {k: [] for k in ("ES", "EM", "PS", "PM", "NS", "NM")}
    for case in cases:
        groups = groups_of(case)
        rows.append({"benchmark": {"source": "counterfact", "scores": case_scores(
            "counterfact", groups, measure(before_km, groups), measure(km, groups))}})
        p = lambda prompt, target: math.exp(plain_measure(km, prompt, target)[0])  # noqa: E731
        request = case.requests[0]
        rewrite = [(p(q, request.new), p(q, request.old)) for q in request.prompts]
        para = [(p(q, probe.answer), p(q, probe.contrast)) for probe in case.probes_of("paraphrase") for q in probe.prompts]
        # neighborhood: the true object must still beat the new one
        neigh = [(p(q, probe.answer), p(q, probe.contrast)) for probe in case.probes_of("neighborhood") for q in probe.prompts]
        for name, pairs in (("E", rewrite), ("P", para), ("N", neigh)):
            plain[f"{name}S"].append(_mean([float(a > b) for a, b in pairs]))
            plain[f"{name}M"].append(_mean([a - b for a, b in pairs]))
    got = summary(rows)
    for key, values in plain.items():
        assert got[f"counterfact/{key}"] == pytest.approx(_mean(values), abs=1e-6), key
    es, ps, ns = (_mean(plain[k]) for k in ("ES", "PS", "NS"))
    expected_s = 0.0 if min(es, ps, ns) == 0 else 3 / (1 / es + 1 / ps + 1 / ns)
    assert got["counterfact/S"] == pytest.approx(expected_s, abs=1e-9)
    assert "counterfact/RS" not in got and "counterfact/GE" not in got  # no generations given: missing, not 0


def test_zsre_and_knowedit_token_accuracies_equal_a_plain_recomputation(two_models):
    before_km, km = two_models

    def acc(model, probes_or_prompts):  # pooled over every answer token of the prompts
        hits = []
        for prompt, answer in probes_or_prompts:
            _, argmax, ids = plain_measure(model, prompt, answer)
            hits += [a == t for a, t in zip(argmax, ids)]
        return _mean([float(h) for h in hits]) if hits else None

    def agreement(pairs):
        same = []
        for prompt, answer in pairs:
            same += [a == b for a, b in zip(plain_measure(before_km, prompt, answer)[1], plain_measure(km, prompt, answer)[1])]
        return _mean([float(s) for s in same]) if same else None

    expected: dict[str, list[float]] = {}
    rows = []
    for source in ("zsre", "knowedit"):
        for case in [c for base in benchmark_cases()[source] for c in (base, answered_by(km, base))]:
            groups = groups_of(case)
            rows.append({"benchmark": {"source": source, "scores": case_scores(
                source, groups, measure(before_km, groups), measure(km, groups))}})
            r = case.requests[0]
            pairs = lambda kind, label=None: [(q, p.answer) for p in case.probes_of(kind)  # noqa: E731
                                              if label is None or p.label == label for q in p.prompts]  # fmt: skip
            plain = {"efficacy" if source == "zsre" else "Reliability": acc(km, [(q, r.new) for q in r.prompts]),
                     "paraphrase" if source == "zsre" else "Generalization": acc(km, pairs("paraphrase"))}
            if source == "zsre":  # specificity: loc_ans's tokens are the argmax (ROME's zsRE evaluation)
                plain["specificity"] = acc(km, pairs("locality"))
            else:  # EasyEdit: locality = argmax unchanged by the edit; portability = token accuracy
                plain["Locality"] = agreement(pairs("locality"))
                plain["Portability"] = acc(km, pairs("portability"))
                for label in {p.label for p in case.probes}:
                    plain[f"Locality/{label}"] = agreement(pairs("locality", label))
                    plain[f"Portability/{label}"] = acc(km, pairs("portability", label))
            for key, value in plain.items():
                if value is not None:
                    expected.setdefault(f"{source}/{key}", []).append(value)
    got = summary(rows)
    assert set(got) == set(expected)
    for source in ("zsre", "knowedit"):  # the model's own answers score: the accuracies are not all 0
        assert sum(v for k, v in got.items() if k.startswith(source) and "Locality" not in k) > 0, got
    for key, values in expected.items():
        assert got[key] == pytest.approx(_mean(values), abs=1e-6), key


@contextmanager
def favouring(km, word: str):
    """The model's output head adds 100 to the logit of `` word``'s first token: the argmax everywhere."""
    tid = km.tokenizer(" " + word, add_special_tokens=False)["input_ids"][0]
    bias = torch.zeros(km.model.get_output_embeddings().weight.shape[0])
    bias[tid] = 100.0
    handle = km.model.get_output_embeddings().register_forward_hook(lambda module, args, out: out + bias)
    try:
        yield km
    finally:
        handle.remove()


def test_mquake_multihop_accuracy_is_any_question_answered(two_models):
    before_km, km = two_models
    cases = benchmark_cases()["mquake"]
    with favouring(before_km, "France"), favouring(km, "Spain"):  # m0's before answer, m0's new answer
        rows, expected = [], {"multihop_before": [], "multihop_after": []}
        for case in cases:
            groups = groups_of(case)
            rows.append({"benchmark": {"source": "mquake", "scores": case_scores(
                "mquake", groups, measure(before_km, groups), measure(km, groups))}})
            top1 = lambda model, q, a: all(x == t for x, t in zip(*plain_measure(model, q, a)[1:]))  # noqa: E731
            (probe,) = case.probes_of("multihop")
            expected["multihop_before"].append(float(any(top1(before_km, q, a) for q in probe.prompts
                                                         for a in (probe.before, *probe.before_aliases))))  # fmt: skip
            expected["multihop_after"].append(float(any(top1(km, q, a) for q in probe.prompts
                                                        for a in (probe.answer, *probe.aliases))))  # fmt: skip
    got = summary(rows)
    assert expected == {"multihop_before": [1.0, 0.0], "multihop_after": [1.0, 0.0]}  # the plain loop sees the bias
    for key, values in expected.items():
        assert got[f"mquake/{key}"] == pytest.approx(_mean(values)), key


def test_multihop_counts_a_case_when_any_question_is_answered():
    group = Group("multihop", ("q1", "q2"), "Spain", before="France")
    hit, miss = Measured(-1.0, (1,), (True,)), Measured(-1.0, (2,), (False,))
    measured = {(0, 0, "Spain"): miss, (0, 1, "Spain"): hit, (0, 0, "France"): miss, (0, 1, "France"): miss}
    assert multihop_answered([group], measured, before=False) is True
    assert multihop_answered([group], measured, before=True) is False


def test_generation_accuracy_equals_a_plain_greedy_loop(two_models):
    km = two_models[1]
    seen = []
    for source, cases in benchmark_cases().items():
        for case in [c for base in cases for c in (base, answered_by(km, base))]:
            groups = groups_of(case)
            measured = measure(km, groups)
            gen = generate(km, groups, measured, extra_tokens=2)
            longest = max(len(m.hits) for m in measured.values())
            scores = case_scores(source, groups, measured, measured, gen_before=gen, gen_after=gen)
            for kind in {g.kind for g in groups}:
                flags = []
                for g, group in enumerate(groups):
                    if group.kind == kind:
                        for i, prompt in enumerate(group.prompts):
                            text = plain_greedy(km, prompt, longest + 2)
                            assert gen[(g, i)] == text
                            answers = (group.answer, *group.aliases)
                            flags.append(any(text.lstrip().lower().startswith(a.lower()) for a in answers))
                seen += flags
                expected = float(any(flags)) if kind == "multihop" else _mean([float(f) for f in flags])
                key = f"gen/{kind}_after" if kind == "multihop" else f"gen/{kind}"
                assert scores[key] == pytest.approx(expected), (source, kind)
    assert any(seen) and not all(seen)  # the model's own continuations count, the benchmarks' answers do not


def test_generation_correct_is_a_case_blind_prefix_match_on_answer_or_alias():
    assert generation_correct(" paris, the city", ["Paris"])
    assert generation_correct("  Espana!", ["Spain", "España", "Espana"])
    assert not generation_correct(" The city of Paris", ["Paris"])
    assert not generation_correct(" Rome", ["Paris", "  "])


def test_reference_score_is_the_tfidf_cosine_written_out():
    docs = ["Rome is in Italy", "Madrid is in Spain", "Rome Rome pasta"]
    idf = idf_weights(docs)
    n = 3
    df = {"rome": 2, "is": 2, "in": 2, "italy": 1, "madrid": 1, "spain": 1, "pasta": 1}
    assert idf == pytest.approx({t: math.log((1 + n) / (1 + k)) + 1 for t, k in df.items()})
    a, b = "Rome, Rome and pasta!", "Italy: Rome is in Italy"  # "and" is outside the fitted vocabulary
    va = {"rome": 2 * idf["rome"], "pasta": idf["pasta"]}
    vb = {"italy": 2 * idf["italy"], "rome": idf["rome"], "is": idf["is"], "in": idf["in"]}
    dot = va["rome"] * vb["rome"]
    norm = lambda v: math.sqrt(sum(x * x for x in v.values()))  # noqa: E731
    assert tfidf_cosine(a, b, idf) == pytest.approx(dot / norm(va) / norm(vb))
    assert tfidf_cosine("nothing known here", b, idf) is None  # undefined, never 0


def test_generation_entropy_and_reference_score_of_a_case():
    case = benchmark_cases()["counterfact"][0]
    groups = groups_of(case)
    measured = {(g, i, t): Measured(-1.0, (0,), (True,)) for g, grp in enumerate(groups) for i in range(len(grp.prompts)) for t in grp.targets()}  # fmt: skip
    texts = ["France is a city in Italy. Rome is located in Italy.", "The story of France is Rome Rome"]
    idf = idf_weights(list(case.reference_texts))
    scores = case_scores("counterfact", groups, measured, measured, texts, case.reference_texts, idf)
    assert scores["GE"] == pytest.approx(ngram_entropy(texts))
    assert scores["RS"] == pytest.approx(tfidf_cosine(" ".join(texts), " ".join(case.reference_texts), idf))
    no_refs = case_scores("counterfact", groups, measured, measured, texts, (), idf)
    assert "RS" not in no_refs and "GE" in no_refs


def test_harmonic_mean():
    assert harmonic_mean([0.5, 1.0, 1.0]) == pytest.approx(3 / (2 + 1 + 1))
    assert harmonic_mean([0.0, 1.0, 1.0]) == 0.0
