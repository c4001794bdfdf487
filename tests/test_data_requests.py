"""Edit requests the paper's way (expressible, known, a seeded new object of the same relation), the
DataModule's clear errors on unusable fact sets, and the perplexity text."""

from __future__ import annotations

import json

import pytest

from kn_edit.data import FactRecord, FactSet, choose_new_object, expressible, known_mask, text_file_passages, wiki_passages
from kn_edit.data.requests import prompt_top1
from kn_edit.errors import DataError
from kn_edit.evaluation import DataConfig, FactDataModule


def record(i: int, relation: str = "capital", obj: str = "Paris", subject: str = "France") -> FactRecord:
    return FactRecord(f"{relation}:{i}", subject, relation, obj, (f"The capital of {subject} is",))


def test_new_object_is_another_object_of_the_relation_and_seeded():
    objects = ["Paris", "Rome", "Tokyo", "Berlin"]
    fact = record(0)
    picks = {choose_new_object(fact, objects, seed) for seed in range(20)}
    assert "Paris" not in picks and picks <= set(objects) and len(picks) > 1
    assert choose_new_object(fact, objects, 3) == choose_new_object(fact, list(reversed(objects)) and objects, 3)
    assert choose_new_object(fact, ["Paris"], 0) is None


def test_unexpressible_objects_are_skipped_with_a_reason(tiny_factory):
    km = tiny_factory("bert")  # a WordPiece vocabulary: unknown words become [UNK]
    facts = FactSet("t", [FactRecord("a", "France", "capital", "paris", ("The capital of France is [MASK].",)),
                          FactRecord("b", "Mars", "capital", "zzzqqq", ("The capital of Mars is [MASK].",))])  # fmt: skip
    kept = expressible(km, facts)
    assert [r.fact_id for r in kept.records] == ["a"]
    assert kept.skipped_counts() == {"object not expressible by the tokenizer": 1}


def test_top1_check_matches_a_plain_reference(tiny_factory):
    km = tiny_factory("llama")
    prompt = "The capital of France is"
    top_id = km.predict(prompt, top_k=1)[0].token_id
    top = km.tokenizer.decode([top_id]).lstrip()
    pairs = [(prompt, top), (prompt, "Paris, France"), (prompt, "Tokyo")]
    expected = []
    for p, target in pairs:
        steps = km.encode(p, target).steps
        expected.append(all(int(km.step_logits([s])[0].argmax()) == s.target_id for s in steps))
    assert prompt_top1(km, pairs, batch_size=2) == expected


@pytest.mark.integration
def test_known_facts_on_smollm2(smollm2):
    facts = [FactRecord("fr", "France", "capital", "Paris", ("The capital of France is", "France's capital city is")),
             FactRecord("xx", "France", "capital", "Tokyo", ("The capital of France is",))]  # fmt: skip
    assert known_mask(smollm2, facts) == [True, False]


def test_datamodule_errors_on_empty_and_unknown_fact_sets(tiny_factory):
    km = tiny_factory("llama")
    with pytest.raises(DataError, match="empty"):
        FactDataModule(km, DataConfig(), facts=FactSet("none", [])).setup("test")
    facts = FactSet("two", [record(0), record(1, obj="Rome", subject="Italy")])
    with pytest.raises(DataError, match="predicts none of them"):
        FactDataModule(km, DataConfig(), facts=facts).setup("test")  # a random model knows nothing
    single = FactSet("one", [record(0)])
    with pytest.raises(DataError, match="relation has no other usable object"):
        FactDataModule(km, DataConfig(only_known=False), facts=single).setup("test")


def test_datamodule_limits_and_neighbours(tiny_factory):
    km = tiny_factory("llama")
    subjects = [("France", "Paris"), ("Italy", "Rome"), ("Japan", "Tokyo"), ("Germany", "Berlin")]
    records = [record(i, "capital", o, s) for i, (s, o) in enumerate(subjects)]
    records += [FactRecord(f"lang:{i}", s, "language", o, (f"The language of {s} is",)) for i, (s, o) in
                enumerate([("France", "French"), ("Italy", "Italian")])]  # fmt: skip
    dm = FactDataModule(km, DataConfig(only_known=False, facts_per_relation=1, neighbours=2), facts=FactSet("t", records))
    dm.setup("test")
    assert [c.fact.relation for c in dm.cases] == ["capital", "language"]  # relations interleaved, 1 each
    assert dm.summary["facts_not_selected_limit"] + dm.summary["facts_edited"] == 6
    for case in dm.cases:
        assert case.new != case.fact.object and len(case.same_relation) <= 2 and len(case.other_relation) == 2
        assert all(r.relation == case.fact.relation and r.fact_id != case.fact.fact_id for r in case.same_relation)
        assert all(r.relation != case.fact.relation for r in case.other_relation)
    again = FactDataModule(km, DataConfig(only_known=False, facts_per_relation=1, neighbours=2), facts=FactSet("t", records))
    again.setup("test")
    assert again.cases == dm.cases  # seeded


def test_wiki_heldout_slice_and_text_files(tmp_path):
    summaries = {f"Title {i:03d}": {"title": f"Title {i:03d}", "extract": f"Text number {i}."} for i in range(40)}
    path = tmp_path / "summaries_en-us.json"
    path.write_text(json.dumps(summaries))
    assert wiki_passages(3, path) == ["Text number 9.", "Text number 19.", "Text number 29."]
    with pytest.raises(DataError, match="held-out slice has 4"):
        wiki_passages(5, path)
    path.write_text(json.dumps({"a": "not a record"}))
    with pytest.raises(DataError, match="expected"):
        wiki_passages(1, path)
    text = tmp_path / "t.txt"
    text.write_text("First  paragraph\nstill first.\n\n\nSecond one.\n")
    assert text_file_passages(text) == ["First paragraph still first.", "Second one."]
    with pytest.raises(DataError, match="not found"):
        text_file_passages(tmp_path / "none.txt")
    # Read a line at a time, split as the whole text's split("\n\n"), and no further than the n passages asked for.
    for raw in ["\n\nA\n \nB\n\n\n\nC", "\nA\r\n\r\nB\u2028b\n\n \n\nC  \n", "A\n\n\nB", "A\x0c\n\nB"]:
        text.write_text(raw, encoding="utf-8", newline="")
        whole = [" ".join(p.split()) for p in text.read_text(encoding="utf-8").split("\n\n")]
        assert text_file_passages(text) == [p for p in whole if p]
    text.write_bytes(b"First.\n\nSecond " * 100_000 + b"\n\n\xff")
    assert text_file_passages(text, 2) == ["First.", "Second First."]
    with pytest.raises(DataError, match="not UTF-8"):
        text_file_passages(text)


@pytest.mark.parametrize("min_share", [1.0, 0.7, 0.5, 0.34, 0.01])
def test_known_check_in_rounds_equals_checking_every_prompt(monkeypatch, min_share):
    """known_mask stops checking a fact once it is decided; the flags equal the plain rule over every prompt."""
    import itertools

    import kn_edit.data.requests as requests

    truth = {}  # (prompt, object) → top-1, every pattern of 0–4 prompts
    records = []
    for n in range(5):
        for pattern in itertools.product([True, False], repeat=n):
            fid = f"f{len(records)}"
            prompts = tuple(f"{fid} prompt {j} is" for j in range(n))
            truth.update({(p, "X"): ok for p, ok in zip(prompts, pattern)})
            records.append(FactRecord(fid, "s", "r", "X", prompts))
    asked: list[tuple[str, str]] = []

    def top1(km, pairs, batch_size=64):
        asked.extend(pairs)
        return [truth[p] for p in pairs]

    monkeypatch.setattr(requests, "prompt_top1", top1)
    got = requests.known_mask(None, records, min_share)
    plain = [len(r.prompts) > 0 and sum(truth[(p, "X")] for p in r.prompts) >= min_share * len(r.prompts) for r in records]
    assert got == plain
    assert len(asked) == len(set(asked)) < len(truth)  # each prompt at most once, and some never


def test_known_check_on_a_tiny_model_equals_the_plain_rule(tiny_factory):
    km = tiny_factory("llama")
    prompts = ["The capital of France is", "France's capital is", "The capital city of France is"]
    tops = [km.tokenizer.decode([km.predict(p, top_k=1)[0].token_id]).lstrip() for p in prompts]
    records = [FactRecord(f"f{i}", "France", "capital", obj, tuple(prompts)) for i, obj in enumerate(tops + ["Paris"])]
    for share in (1.0, 0.5, 0.3):
        flags = [prompt_top1(km, [(p, r.object) for p in r.prompts]) for r in records]
        assert known_mask(km, records, share) == [sum(f) >= share * len(f) for f in flags]
