"""The field's benchmark files read into BenchmarkCases (every field in its place, malformed records a one-line
DataError naming the record and the field), and the CounterFact- and MQuAKE-style sets built from ParaRel:
what they hold, their round trip through the readers, and the commands that write them."""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import pytest

from helpers import write_pararel
from kn_edit.cli import main
from kn_edit.data import (BenchmarkCase, Probe, build_counterfact, build_two_hop, load_benchmark,
                          load_pararel, read_counterfact, read_knowedit, read_mquake, read_zsre, write_benchmark)
from kn_edit.data.benchmarks.counterfact import counterfact_case
from kn_edit.data.records import EditRequest
from kn_edit.errors import ConfigError, DataError, EditError

CF = {
    "case_id": 7, "pararel_idx": 12,
    "requested_rewrite": {"prompt": "The mother tongue of {} is", "subject": "Danielle Darrieux", "relation_id": "P103",
                          "target_new": {"str": "English", "id": "Q1860"}, "target_true": {"str": "French", "id": "Q150"}},
    "paraphrase_prompts": ["Where Danielle Darrieux is from, people speak the language of", "Danielle Darrieux's mother tongue is"],
    "neighborhood_prompts": ["The mother tongue of Léon Blum is", "The native language of Montesquieu is"],
    "attribute_prompts": ["J.R.R. Tolkien is a native speaker of"],
    "generation_prompts": ["Danielle Darrieux's mother tongue is", "Danielle Darrieux was born in"],
}  # fmt: skip
ZSRE = {
    "subject": "Epaspidoceras", "src": "Which family does Epaspidoceras belong to?", "pred": "Aspidoceratidae",
    "rephrase": "What family are Epaspidoceras?", "alt": "Noctuidae", "answers": ["Aspidoceratidae", "Aspidoceratids"],
    "loc": "nq question: who played desmond doss father in hacksaw ridge", "loc_ans": "Hugo Weaving",
    "cond": "Aspidoceratidae >> Noctuidae || Which family does Epaspidoceras belong to?",
}  # fmt: skip
MQUAKE = {
    "case_id": 2500,
    "requested_rewrite": [
        {"prompt": "{} is a citizen of", "relation_id": "P27", "target_new": {"str": "Libya", "id": "Q1016"},
         "target_true": {"str": "United States of America", "id": "Q30"}, "subject": "Vince McMahon"},
        {"prompt": "The capital of {} is", "relation_id": "P36", "target_new": {"str": "Franklin"},
         "target_true": {"str": "Tripoli"}, "subject": "Libya"},
    ],
    "questions": ["What is the capital of the country of citizenship of Vince McMahon?",
                  "Which city is the capital of the country where Vince McMahon is a citizen?"],
    "answer": "Washington, D.C.", "answer_alias": ["Washington"], "answer_extended": ["Washington DC"],
    "new_answer": "Franklin", "new_answer_alias": ["Franklin, Kentucky"],
    "single_hops": [{"question": "?", "cloze": "Vince McMahon is a citizen of", "answer": "United States of America"}],
}  # fmt: skip
KNOWEDIT = {
    "subject": "Leo Arons", "prompt": "The place of death of Leo Arons is", "target_new": "Berlin",
    "ground_truth": ["Hamburg", "Freie und Hansestadt Hamburg"], "rephrase_prompt": "Leo Arons died in",
    "portability": {
        "Logical_Generalization": [{"prompt": "Is Leo Arons still alive?", "ground_truth": [["no"], ["incorrect"]]}],
        "Reasoning": [{"prompt": ["The continent of the place of death of Leo Arons is", "Leo Arons died on the continent of"],
                       "ground_truth": [["Europe", "European continent"]]}],
        "Subject_Aliasing": [{"prompt": "The place of death of Martin Leo Arons is", "ground_truth": "Berlin"}],
    },
    "locality": {"Relation_Specificity": [{"prompt": "The name of the father of Leo Arons is", "ground_truth": ["Albert Arons"]}],
                 "Forgetfulness": []},
}  # fmt: skip
READERS = {"counterfact": (read_counterfact, CF), "zsre": (read_zsre, ZSRE), "mquake": (read_mquake, MQUAKE),
           "knowedit": (read_knowedit, KNOWEDIT)}  # fmt: skip


def write(path: Path, records: list) -> Path:
    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in records))
    else:
        path.write_text(json.dumps(records, indent=2))
    return path


def only(case: BenchmarkCase, kind: str) -> Probe:
    (probe,) = case.probes_of(kind)
    return probe


# ----- each reader: every field reaches its place ---------------------------------------------------------------
@pytest.mark.parametrize("suffix", [".json", ".jsonl"])
def test_counterfact_record(tmp_path, suffix):
    path = write(tmp_path / f"cf{suffix}", [CF])
    (case,) = read_counterfact(path)
    assert (case.case_id, case.source) == ("7", "counterfact")
    assert case.where == f"{path}:" + ("record 0" if suffix == ".json" else "line 1")
    assert case.requests == (EditRequest(("The mother tongue of Danielle Darrieux is",), "French", "English",
                                         subject="Danielle Darrieux", relation="P103"),)  # fmt: skip
    assert only(case, "paraphrase") == Probe("paraphrase", tuple(CF["paraphrase_prompts"]), "English", "French")
    assert only(case, "neighborhood") == Probe("neighborhood", tuple(CF["neighborhood_prompts"]), "French", "English")
    assert only(case, "attribute") == Probe("attribute", tuple(CF["attribute_prompts"]), "English", "French")
    assert case.generation_prompts == tuple(CF["generation_prompts"]) and case.reference_texts == ()


def test_a_trailing_answer_slot_is_cut_from_prompts(tmp_path):
    record = copy.deepcopy(CF)
    record["requested_rewrite"]["prompt"] = "The mother tongue of {} is [Y]."
    record["neighborhood_prompts"] = ["The mother tongue of Léon Blum is [MASK]"]
    (case,) = read_counterfact(write(tmp_path / "cf.json", [record]))
    assert case.requests[0].prompts == ("The mother tongue of Danielle Darrieux is",)
    assert only(case, "neighborhood").prompts == ("The mother tongue of Léon Blum is",)


def test_counterfact_optional_sets_may_be_absent_and_empty_sets_give_no_probe(tmp_path):
    record = {k: v for k, v in CF.items() if k not in ("attribute_prompts", "generation_prompts", "case_id")}
    record["neighborhood_prompts"] = []
    (case,) = read_counterfact(write(tmp_path / "cf.json", [record]))
    assert case.case_id == "0" and [p.kind for p in case.probes] == ["paraphrase"] and case.generation_prompts == ()


def test_zsre_records(tmp_path):
    asked = dict(ZSRE, loc="nq question: where is the eiffel tower?")
    skipped = dict(ZSRE, alt="")
    cases = read_zsre(write(tmp_path / "zsre.json", [ZSRE, skipped, asked]))
    first, last = cases
    assert (first.case_id, first.source, last.case_id) == ("0", "zsre", "2")
    assert first.requests == (EditRequest(("Which family does Epaspidoceras belong to?",), "Aspidoceratidae", "Noctuidae",
                                          subject="Epaspidoceras"),)  # fmt: skip
    assert only(first, "paraphrase") == Probe("paraphrase", ("What family are Epaspidoceras?",), "Noctuidae")
    # loc is a question without its "?": one is added, never doubled
    assert only(first, "locality") == Probe("locality", (ZSRE["loc"] + "?",), "Hugo Weaving")
    assert only(last, "locality").prompts == ("nq question: where is the eiffel tower?",)
    # a record that asks no edit is counted, not dropped silently
    assert [(s.fact_id, s.reason) for s in cases.skipped] == [("1", "no new answer (alt is empty)")]


def test_mquake_record(tmp_path):
    (case,) = read_mquake(write(tmp_path / "mq.json", [MQUAKE]))
    assert (case.case_id, case.source) == ("2500", "mquake")
    assert case.requests == (
        EditRequest(("Vince McMahon is a citizen of",), "United States of America", "Libya", subject="Vince McMahon", relation="P27"),
        EditRequest(("The capital of Libya is",), "Tripoli", "Franklin", subject="Libya", relation="P36"),
    )  # fmt: skip
    assert case.probes == (Probe("multihop", tuple(MQUAKE["questions"]), "Franklin", aliases=("Franklin, Kentucky",),
                                 before="Washington, D.C.", before_aliases=("Washington", "Washington DC")),)  # fmt: skip


def test_knowedit_record_and_its_answer_shapes(tmp_path):
    (case,) = read_knowedit(write(tmp_path / "ke.json", [KNOWEDIT]))
    assert (case.case_id, case.source) == ("0", "knowedit")
    assert case.requests == (EditRequest(("The place of death of Leo Arons is",), "Hamburg", "Berlin", subject="Leo Arons"),)
    assert case.probes == (
        Probe("paraphrase", ("Leo Arons died in",), "Berlin"),
        Probe("portability", ("Is Leo Arons still alive?",), "no", aliases=("incorrect",), label="logical_generalization"),
        Probe("portability", tuple(KNOWEDIT["portability"]["Reasoning"][0]["prompt"]), "Europe",
              aliases=("European continent",), label="reasoning"),
        Probe("portability", ("The place of death of Martin Leo Arons is",), "Berlin", label="subject_aliasing"),
        Probe("locality", ("The name of the father of Leo Arons is",), "Albert Arons", label="relation_specificity"),
    )  # fmt: skip


@pytest.mark.parametrize("source", list(READERS))
def test_load_benchmark_dispatches_to_the_reader(tmp_path, source):
    reader, record = READERS[source]
    path = write(tmp_path / "b.json", [record])
    assert load_benchmark(source, path) == reader(path)


# ----- malformed input: one line naming the record and the field ------------------------------------------------
def _drop(*keys):
    def change(r):
        obj = r
        for key in keys[:-1]:
            obj = obj[key]
        del obj[keys[-1]]
    return change


def _set(value, *keys):
    def change(r):
        obj = r
        for key in keys[:-1]:
            obj = obj[key]
        obj[keys[-1]] = value
    return change


BAD = [
    ("counterfact", _drop("requested_rewrite"), "missing field 'requested_rewrite'"),
    ("counterfact", _drop("requested_rewrite", "subject"), "missing field 'requested_rewrite.subject'"),
    ("counterfact", _drop("requested_rewrite", "prompt"), "missing field 'requested_rewrite.prompt'"),
    ("counterfact", _set("The mother tongue of Danielle is", "requested_rewrite", "prompt"), "needs one '{}' where the subject goes"),
    ("counterfact", _set("{} and {} speak", "requested_rewrite", "prompt"), "requested_rewrite.prompt"),
    ("counterfact", _set(" ", "requested_rewrite", "target_new", "str"), "'requested_rewrite.target_new.str' is empty"),
    ("counterfact", _set("English", "requested_rewrite", "target_new"), "'requested_rewrite.target_new' must be an object"),
    ("counterfact", _set(3, "requested_rewrite", "target_true", "str"), "'requested_rewrite.target_true.str' must be a string"),
    ("counterfact", _set({"str": "French"}, "requested_rewrite", "target_new"), "the same"),
    ("counterfact", _drop("paraphrase_prompts"), "missing field 'paraphrase_prompts'"),
    ("counterfact", _set("one prompt", "neighborhood_prompts"), "'neighborhood_prompts' must be a list of strings"),
    ("counterfact", _set(["fine", 4], "attribute_prompts"), "'attribute_prompts[1]' must be a non-empty string"),
    ("counterfact", _set(["[Y] is spoken by Danielle"], "paraphrase_prompts"), "'paraphrase_prompts[0]': prompt"),
    ("knowedit", _set("The [Y] of Leo Arons", "rephrase_prompt"), "answer slot [Y] before other text"),
    ("counterfact", _set(True, "case_id"), "'case_id' must be a number or a non-empty string"),
    ("counterfact", _set(7.5, "case_id"), "'case_id'"),
    ("zsre", _drop("src"), "missing field 'src'"),
    ("zsre", _set([], "answers"), "'answers' is empty"),
    ("zsre", _set(None, "loc"), "missing field 'loc'"),
    ("zsre", _set(["Noctuidae"], "alt"), "'alt' must be a string"),
    ("mquake", _set([], "requested_rewrite"), "'requested_rewrite' must be a non-empty list"),
    ("mquake", _set("x", "requested_rewrite", 1), "requested_rewrite[1] must be an object"),
    ("mquake", _set(5, "requested_rewrite", 1, "subject"), "'requested_rewrite[1].subject' must be a string"),
    ("mquake", _set("The capital is", "requested_rewrite", 0, "prompt"), "'{}'"),
    ("mquake", _drop("requested_rewrite", 1, "target_true"), "missing field 'requested_rewrite[1].target_true'"),
    ("mquake", _set([], "questions"), "'questions' is empty"),
    ("mquake", _drop("new_answer"), "missing field 'new_answer'"),
    ("mquake", _set("Franklin", "new_answer_alias"), "'new_answer_alias' must be a list of strings"),
    ("knowedit", _drop("ground_truth"), "wiki_recent"),
    ("knowedit", _set("Hamburg", "target_new"), "the same"),
    ("knowedit", _set([], "portability"), "'portability' must be an object"),
    ("knowedit", _set({"prompt": "x"}, "portability", "Reasoning"), "'portability.Reasoning' must be a list"),
    ("knowedit", _set([{"ground_truth": "x"}], "locality", "Forgetfulness"), "missing field 'locality.Forgetfulness[0].prompt'"),
    ("knowedit", _set([["Europe"], [""]], "portability", "Reasoning", 0, "ground_truth"), "ground_truth[1][0]' must be a non-empty"),
    ("knowedit", _set([], "portability", "Reasoning", 0, "prompt"), "'portability.Reasoning[0].prompt' is empty"),
]  # fmt: skip


@pytest.mark.parametrize("source, change, message", BAD, ids=[f"{s}:{m[:40]}" for s, _, m in BAD])
@pytest.mark.parametrize("suffix", [".json", ".jsonl"])
def test_malformed_record_is_one_line_naming_record_and_field(tmp_path, source, change, message, suffix):
    reader, good = READERS[source]
    bad = copy.deepcopy(good)
    if "case_id" in bad:
        bad["case_id"] = 1  # not the good record's id (a change may still set or drop it)
    change(bad)
    path = write(tmp_path / f"bad{suffix}", [good, bad])
    with pytest.raises(DataError) as err:
        reader(path)
    text = str(err.value)
    where = f"{path}:record 1" if suffix == ".json" else f"{path}:line 2"
    assert text.startswith(f"{where}: ") and message in text and "\n" not in text


@pytest.mark.parametrize("content, message", [
    (None, "is a folder"), ("", "is empty"), ("  \n", "is empty"), ("[{]", "not valid JSON at line 1"),
    ('{"case_id": 1}', "expected a JSON list of records, got dict; a file of one record a line must end in .jsonl"),
    ("[]", "no records in the file"), ('[{"case_id": 0}, 3]', "record 1: expected an object, got int"),
])  # fmt: skip
def test_bad_files(tmp_path, content, message):
    path = tmp_path / "b.json"
    path.mkdir() if content is None else path.write_text(content)
    with pytest.raises(DataError, match=re.escape(message)):
        read_counterfact(path)


def test_bad_jsonl_missing_file_wrong_source_and_duplicate_ids(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        read_zsre(tmp_path / "none.json")
    lines = tmp_path / "b.jsonl"
    lines.write_text(json.dumps(CF) + "\n{oops\n")
    with pytest.raises(DataError, match=r"b\.jsonl:2: not valid JSON"):
        read_counterfact(lines)
    with pytest.raises(DataError, match=r"record 0: this looks like a zsre record .* read it as source zsre"):
        read_counterfact(write(tmp_path / "z.json", [ZSRE]))
    with pytest.raises(DataError, match=r"record 1: case_id '7' is also the id of .*record 0"):
        read_counterfact(write(tmp_path / "dup.json", [CF, CF]))
    with pytest.raises(DataError, match="no usable records"):
        read_zsre(write(tmp_path / "none_usable.json", [dict(ZSRE, alt="Aspidoceratidae")]))
    with pytest.raises(ConfigError, match="unknown benchmark source 'cf'"):
        load_benchmark("cf", lines)


# ----- the CounterFact-style set built from ParaRel --------------------------------------------------------------
CITIZENS = [("Alice", "France"), ("Dan", "France"), ("Erin", "France"), ("Bob", "Italy"), ("Frank", "Italy"),
            ("Carol", "Japan"), ("Gina", "Japan"), ("Hank", "Peru")]  # fmt: skip
CITIZEN_PATTERNS = ["[X] is a citizen of [Y].", "[X] holds the citizenship of [Y].", "[X] has a passport of [Y].",
                    "[Y] issued the passport of [X]."]  # fmt: skip


@pytest.fixture
def citizens(tmp_path):
    return load_pararel(write_pararel(tmp_path / "pr", {"P27": CITIZEN_PATTERNS}, {"P27": CITIZENS}), seed=0)


def test_counterfact_builder_puts_each_kind_of_prompt_where_it_belongs(citizens):
    country = dict(CITIZENS)
    records = build_counterfact(citizens, n=100, seed=0, paraphrases=2, neighbours=2, attributes=3, generation=2)
    # Hank is Peru's only citizen: no neighbourhood, so not a case (Peru may still be another fact's new object)
    assert sorted(r["requested_rewrite"]["subject"] for r in records) == sorted(s for s, _ in CITIZENS if s != "Hank")
    assert [r["case_id"] for r in records] == list(range(len(records)))
    for r in records:
        rw = r["requested_rewrite"]
        subject, true, new = rw["subject"], rw["target_true"]["str"], rw["target_new"]["str"]
        fact = citizens.records[r["pararel_idx"]]
        assert (fact.subject, fact.object, rw["relation_id"]) == (subject, true, "P27") and country[subject] == true
        assert new != true and new in country.values()
        filled = rw["prompt"].replace("{}", subject)
        assert rw["prompt"].count("{}") == 1 and filled in fact.prompts
        assert set(r["paraphrase_prompts"]) <= set(fact.all_prompts) - {filled} and len(r["paraphrase_prompts"]) == 2
        for key, answer in (("neighborhood_prompts", true), ("attribute_prompts", new)):
            owners = [next(s for s in country if p.startswith(s)) for p in r[key]]
            assert owners and len(set(owners)) == len(owners) and subject not in owners
            assert all(country[s] == answer for s in owners)
        others = [s for s in country if country[s] == new and s != subject]
        assert len(r["attribute_prompts"]) == min(3, len(others)) and len(r["neighborhood_prompts"]) <= 2
        assert len(r["generation_prompts"]) == 2 and all(p.startswith(subject) for p in r["generation_prompts"])
    assert build_counterfact(citizens, n=100, seed=0, paraphrases=2, neighbours=2, attributes=3, generation=2) == records
    assert [r["pararel_idx"] for r in build_counterfact(citizens, n=3, seed=1)] == \
        sorted(r["pararel_idx"] for r in build_counterfact(citizens, n=3, seed=1))


@pytest.mark.parametrize("suffix", [".json", ".jsonl"])
def test_counterfact_builder_round_trips_through_the_reader(citizens, tmp_path, suffix):
    records = build_counterfact(citizens, n=5, seed=3)
    path = write_benchmark(records, tmp_path / f"cf{suffix}")
    cases = read_counterfact(path)
    assert len(cases) == 5
    for i, (record, case) in enumerate(zip(records, cases)):
        assert case == counterfact_case(record, case.where, i)
        rw = record["requested_rewrite"]
        assert case.requests[0] == EditRequest((rw["prompt"].replace("{}", rw["subject"]),), rw["target_true"]["str"],
                                               rw["target_new"]["str"], subject=rw["subject"], relation="P27")  # fmt: skip
        assert only(case, "neighborhood").prompts == tuple(record["neighborhood_prompts"])
    with pytest.raises(EditError, match="already exists"):
        write_benchmark(records, path)
    write_benchmark(records[:1], path, overwrite=True)
    assert len(read_counterfact(path)) == 1


def test_builders_refuse_bad_counts_and_sets_without_cases(citizens, tmp_path):
    with pytest.raises(ConfigError, match="n must be a whole number of at least 1"):
        build_counterfact(citizens, n=0)
    with pytest.raises(ConfigError, match="neighbours must be"):
        build_counterfact(citizens, neighbours=-1)
    lonely = load_pararel(write_pararel(tmp_path / "one", {"P27": CITIZEN_PATTERNS}, {"P27": [("A", "X"), ("B", "Y")]}))
    with pytest.raises(DataError, match="no fact of .* has the paraphrases, neighbours and attributes"):
        build_counterfact(lonely)
    with pytest.raises(DataError, match="no two-hop chain"):
        build_two_hop(citizens)
    masked = load_pararel(write_pararel(tmp_path / "m", {"P27": CITIZEN_PATTERNS}, {"P27": CITIZENS}), masked=True)
    with pytest.raises(DataError, match="masked-LM prompts"):
        build_counterfact(masked)


# ----- two-hop chains in MQuAKE's layout -------------------------------------------------------------------------
CAPITAL = {"France": "Paris", "Italy": "Rome", "Japan": "Tokyo", "Belgium": "Brussels"}
LANGUAGE = {"France": "French", "Italy": "Italian", "Japan": "Japanese", "Belgium": "French"}  # a move that changes no answer
CHAIN_CITIZENS = CITIZENS + [("Ivy", "Spain"), ("Jack", "Belgium")]


@pytest.fixture
def chains_world(tmp_path):
    facts = {"P27": CHAIN_CITIZENS,
             "P36": list(CAPITAL.items()) + [("Spain", "Madrid"), ("Spain", "Toledo")],  # two capitals: no chain
             "P37": list(LANGUAGE.items()),
             "P101": [("Alice", "physics"), ("Bob", "poetry")]}  # no first-hop noun phrase: never a chain
    patterns = {"P27": CITIZEN_PATTERNS, "P36": ["The capital of [X] is [Y].", "[X]'s capital is [Y].", "[Y] is the capital of [X]."],
                "P37": ["The official language of [X] is [Y].", "In [X], [Y] is the official language."],
                "P101": ["[X] works in the field of [Y]."]}  # fmt: skip
    return load_pararel(write_pararel(tmp_path / "pr", patterns, facts), seed=0)


def test_two_hop_builder_gives_the_expected_chains(chains_world, tmp_path):
    records = build_two_hop(chains_world, n=100, seed=0)
    answers = {"P36": CAPITAL, "P37": LANGUAGE}
    noun = "the country of citizenship of {}"
    expected = {(s, r2) for s, c in CHAIN_CITIZENS if c in CAPITAL for r2 in answers}
    assert len(records) == len(expected)
    assert {(r["requested_rewrite"][0]["subject"], r["orig"]["triples_labeled"][1][1]) for r in records} == expected
    for r in records:
        (rw,) = r["requested_rewrite"]
        subject, old, new = rw["subject"], rw["target_true"]["str"], rw["target_new"]["str"]
        r2 = r["orig"]["triples_labeled"][1][1]
        assert rw["relation_id"] == "P27" and old == dict(CHAIN_CITIZENS)[subject] and new in CAPITAL and new != old
        assert (r["answer"], r["new_answer"]) == (answers[r2][old], answers[r2][new]) and r["new_answer"] != r["answer"]
        phrase = noun.format(subject)
        assert r["questions"] == (["The capital of " + phrase + " is"] if r2 == "P36" else
                                  ["The official language of " + phrase + " is"])  # "'s" patterns left out
        assert [h["answer"] for h in r["single_hops"]] == [old, r["answer"]]
        assert [h["answer"] for h in r["new_single_hops"]] == [new, r["new_answer"]]
    cases = read_mquake(write_benchmark(records, tmp_path / "mh.json"))
    for r, case in zip(records, cases):
        (rw,) = r["requested_rewrite"]
        assert case.requests == (EditRequest((rw["prompt"].replace("{}", rw["subject"]),), rw["target_true"]["str"],
                                             rw["target_new"]["str"], subject=rw["subject"], relation="P27"),)  # fmt: skip
        assert case.probes == (Probe("multihop", tuple(r["questions"]), r["new_answer"], before=r["answer"]),)
    assert len(build_two_hop(chains_world, n=3, seed=0)) == 3
    # the edit always moves the answer: never to a country with the same capital or language (Belgium for France)
    assert all(r["new_answer"] != r["answer"] for seed in range(1, 6) for r in build_two_hop(chains_world, seed=seed))


# ----- the commands ------------------------------------------------------------------------------------------------
def test_make_counterfact_writes_the_file_and_refuses_an_existing_out(tmp_path, capsys):
    root = write_pararel(tmp_path / "pr", {"P27": CITIZEN_PATTERNS}, {"P27": CITIZENS})
    out = tmp_path / "cf.json"
    assert main(["make-counterfact", "--pararel", str(root), "--out", str(out), "--facts", "4", "--seed", "2"]) == 0
    assert f"wrote 4 CounterFact records to {out}" in capsys.readouterr().out
    written = out.read_bytes()
    assert json.loads(written) == build_counterfact(load_pararel(root, seed=2), n=4, seed=2)
    assert main(["make-counterfact", "--pararel", str(root), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert "already exists" in err and "--overwrite" in err and "\n" not in err and out.read_bytes() == written
    assert main(["make-counterfact", "--pararel", str(root), "--out", str(out), "--facts", "0", "--overwrite"]) == 2
    assert "at least 1" in capsys.readouterr().err and out.read_bytes() == written
    assert main(["make-counterfact", "--pararel", str(root), "--out", str(out), "--overwrite", "--facts", "50"]) == 0
    assert "only 7 of the 50" in capsys.readouterr().out.replace("\n", " ") and len(read_counterfact(out)) == 7


def test_make_multihop_writes_mquake_records(chains_world, tmp_path, capsys):
    out = tmp_path / "mh.jsonl"
    root = Path(chains_world.name.split(":", 1)[1])
    assert main(["make-multihop", "--pararel", str(root), "--out", str(out), "--facts", "2", "--relations", "P27,P36"]) == 0
    cases = load_benchmark("mquake", out)
    assert len(cases) == 2 and all(c.probes[0].answer in CAPITAL.values() for c in cases)
    assert main(["make-multihop", "--pararel", str(root), "--out", str(out)]) == 2
