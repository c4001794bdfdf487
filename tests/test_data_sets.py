"""Fact data sets: ParaRel, Known 1000 and user JSONL read into FactRecords; bad data gives clear DataErrors;
skipped facts are counted, never dropped silently."""

from __future__ import annotations

import json

import pytest

from kn_edit.data import download_pararel, load_jsonl_facts, load_known1000, load_pararel
from kn_edit.data.pararel import split_patterns
from kn_edit.errors import DataError
from helpers import write_pararel


CAPITALS = [("France", "Paris"), ("Italy", "Rome"), ("Japan", "Tokyo")]
CAPITAL_PATTERNS = ["The capital of [X] is [Y] .", "[X]'s capital is [Y].", "[X] has its capital in [Y]",
                    "[Y] is the capital of [X]."]  # fmt: skip


def test_pararel_causal_prompts_end_at_the_slot_and_split_into_heldout(tmp_path):
    root = write_pararel(tmp_path / "pr", {"P36": CAPITAL_PATTERNS}, {"P36": CAPITALS})
    facts = load_pararel(root, heldout_fraction=0.34, seed=0)
    assert len(facts) == 3 and not facts.skipped
    record = facts.records[0]
    assert record.fact_id == "P36:P36-0" and (record.subject, record.object) == ("France", "Paris")
    # 3 of the 4 patterns end with [Y]; one of them is held out (round(0.34 * 3) = 1).
    assert set(record.all_prompts) == {"The capital of France is", "France's capital is", "France has its capital in"}
    assert len(record.prompts) == 2 and len(record.heldout_prompts) == 1
    # The same templates are held out for every fact of the relation.
    templates = {r.heldout_prompts[0].replace(r.subject, "[X]") for r in facts.records}
    assert len(templates) == 1


def test_pararel_masked_models_use_every_pattern(tmp_path):
    root = write_pararel(tmp_path / "pr", {"P36": CAPITAL_PATTERNS}, {"P36": CAPITALS})
    record = load_pararel(root, masked=True, heldout_fraction=0.25).records[0]
    assert len(record.all_prompts) == 4 and all("[Y]" in p for p in record.all_prompts)


def test_pattern_split_is_seeded_and_keeps_an_edit_prompt():
    patterns = [f"p{i}" for i in range(7)]
    a = split_patterns(patterns, "P1", 0.3, seed=1)
    assert a == split_patterns(patterns, "P1", 0.3, seed=1)
    assert len(a[1]) == 2 and sorted(a[0] + a[1]) == patterns
    assert split_patterns(["only"], "P1", 0.3, 0) == (["only"], [])
    assert len(split_patterns(["a", "b"], "P1", 0.9, 0)[0]) == 1
    with pytest.raises(DataError, match="heldout_fraction"):
        split_patterns(patterns, "P1", 1.0, 0)


def test_relations_without_usable_patterns_are_counted_not_dropped(tmp_path):
    root = write_pararel(
        tmp_path / "pr",
        {"P36": CAPITAL_PATTERNS, "P99": ["[Y] is where [X] lives."]},
        {"P36": CAPITALS, "P99": [("Ann", "Oslo"), ("Bob", "Rome")], "P31": [("Rex", "dog")]},
    )
    facts = load_pararel(root)
    assert len(facts) == 3
    assert facts.skipped_counts() == {"relation has no pattern file": 1, "relation has no usable pattern": 2}
    assert len(load_pararel(root, masked=True)) == 5  # a masked LM can use the P99 pattern


def test_pararel_bad_data_names_file_and_line(tmp_path):
    root = write_pararel(tmp_path / "pr", {"P36": CAPITAL_PATTERNS}, {"P36": CAPITALS})
    with open(root / "facts" / "P36.jsonl", "a") as f:
        f.write('{"sub_label": "Spain", "obj_label": ""}\n')
    with pytest.raises(DataError, match=r"P36\.jsonl:4: 'obj_label' must be a non-empty string"):
        load_pararel(root)
    (root / "facts" / "P36.jsonl").write_text('{"sub_label": "Spain", "obj_label": "Madrid"}\n{not json\n')
    with pytest.raises(DataError, match=r"P36\.jsonl:2: not valid JSON"):
        load_pararel(root)


def test_pararel_missing_folder_and_unknown_relation(tmp_path):
    with pytest.raises(DataError, match="ParaRel folder not found"):
        load_pararel(tmp_path / "nowhere")
    root = write_pararel(tmp_path / "pr", {"P36": CAPITAL_PATTERNS}, {"P36": CAPITALS})
    with pytest.raises(DataError, match=r"\['P1'\] have no fact file"):
        load_pararel(root, relations=["P1"])


def test_pararel_download_fetches_every_relation_into_a_folder(tmp_path, monkeypatch):
    # A local mirror of the public layout, read through file:// URLs (the tests never go online).
    mirror = tmp_path / "mirror"
    (mirror / "pattern_data" / "graphs_json").mkdir(parents=True)
    (mirror / "trex_lms_vocab").mkdir(parents=True)
    import kn_edit.data.pararel as pararel

    monkeypatch.setattr(pararel, "PARAREL_RELATIONS", ("P36", "P31"))
    (mirror / "trex_lms_vocab" / "P36.jsonl").write_text(json.dumps({"sub_label": "France", "obj_label": "Paris"}) + "\n")
    (mirror / "trex_lms_vocab" / "P31.jsonl").write_text(json.dumps({"sub_label": "Rex", "obj_label": "dog"}) + "\n")
    (mirror / "pattern_data" / "graphs_json" / "P36.jsonl").write_text(json.dumps({"pattern": "The capital of [X] is [Y]."}) + "\n")
    dest = download_pararel(tmp_path / "cache", base_url=mirror.as_uri())
    facts = load_pararel(dest)
    assert [r.prompts for r in facts.records] == [("The capital of France is",)]
    assert facts.skipped_counts() == {"relation has no pattern file": 1}


def test_shared_pararel_reads_every_fact(shared_data):
    facts = load_pararel(shared_data / "pararel", relations=["P17", "P37"])
    assert len(facts) == 912 + 900 and not facts.skipped
    assert all(r.prompts and "[Y]" not in "".join(r.all_prompts) for r in facts.records)
    assert all(not r.heldout_prompts for r in facts.records if r.relation == "P37")  # one causal pattern only


def test_known1000_file_and_folder(shared_data, tmp_path):
    facts = load_known1000(shared_data / "known_1000")
    assert len(facts) == 1209
    first = facts.records[0]
    assert (first.subject, first.relation, first.object) == ("Vinson Massif", "P30", "Antarctica")
    assert first.prompts == ("Vinson Massif is located in the continent of",) and first.heldout_prompts == ()
    assert load_known1000(shared_data / "known_1000" / "known_1000.json", masked=True).records[0].prompts[0].endswith("[Y].")
    bad = tmp_path / "k.json"
    bad.write_text(json.dumps([{"prompt": "X is in", "subject": "X", "relation_id": "P1"}]))
    with pytest.raises(DataError, match=r"record 0: 'attribute'"):
        load_known1000(bad)
    with pytest.raises(DataError, match="not found"):
        load_known1000(tmp_path / "missing.json")


def test_user_jsonl(tmp_path):
    path = tmp_path / "facts.jsonl"
    path.write_text(
        json.dumps({"subject": "France", "relation": "capital", "object": "Paris", "id": "fr",
                    "prompts": ["The capital of [X] is", "[X]'s capital is [Y]."], "heldout_prompts": ["[X] has its capital in"]})
        + "\n\n"
        + json.dumps({"subject": "Italy", "relation": "capital", "object": "Rome", "prompts": ["The capital of [X] is"]})
        + "\n"
    )  # fmt: skip
    facts = load_jsonl_facts(path)
    assert facts.records[0].prompts == ("The capital of France is", "France's capital is")
    assert facts.records[0].heldout_prompts == ("France has its capital in",)
    assert facts.records[1].fact_id == "facts.jsonl:3" and facts.records[1].heldout_prompts == ()


@pytest.mark.parametrize(
    "line, message",
    [
        ("[1, 2]", "expected a JSON object"),
        ('{"subject": "A", "relation": "r", "object": "B"', "not valid JSON"),
        ('{"subject": "A", "relation": "r", "prompts": ["[X] is"]}', "'object' must be a non-empty string"),
        ('{"subject": "A", "relation": "r", "object": "B", "prompts": []}', "'prompts' is empty"),
        ('{"subject": "A", "relation": "r", "object": "B", "prompts": ["[Y] is [X]"]}', "answer slot"),
    ],
)
def test_user_jsonl_malformed_lines_name_file_and_line(tmp_path, line, message):
    path = tmp_path / "facts.jsonl"
    good = json.dumps({"subject": "A", "relation": "r", "object": "B", "prompts": ["[X] is"]})
    path.write_text(good + "\n" + line + "\n")
    with pytest.raises(DataError, match=rf"facts\.jsonl:2: .*{message}"):
        load_jsonl_facts(path)


def test_empty_and_missing_user_files(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(DataError, match="no facts"):
        load_jsonl_facts(empty)
    with pytest.raises(DataError, match="no such file"):
        load_jsonl_facts(tmp_path / "missing.jsonl")


def test_known1000_downloads_into_the_cache(tmp_path, monkeypatch, shared_data):
    monkeypatch.setenv("KN_EDIT_CACHE", str(tmp_path / "cache"))
    url = (shared_data / "known_1000" / "known_1000.json").as_uri()
    facts = load_known1000(url=url)
    assert len(facts) == 1209 and (tmp_path / "cache" / "data" / "known_1000" / "known_1000.json").is_file()
    assert len(load_known1000(download=False)) == 1209  # read from the cache now
    with pytest.raises(DataError, match="not found"):
        monkeypatch.setenv("KN_EDIT_CACHE", str(tmp_path / "other"))
        load_known1000(url=(tmp_path / "missing.json").as_uri())


def test_pararel_subject_first_split_holds_out_the_patterns_that_begin_with_the_subject(tmp_path):
    root = write_pararel(tmp_path / "pr",
                         {"P36": ["The capital of [X] is [Y].", "[X]'s capital is [Y].", "In [X], the capital is [Y].",
                                  "[X] has the capital [Y]."],
                          "P17": ["[X] is located in [Y].", "[X] lies in [Y]."]},  # every pattern begins with [X]
                         {"P36": [("France", "Paris")], "P17": [("Eiffel Tower", "France")]})  # fmt: skip
    facts = load_pararel(root, heldout="subject_first", max_prompts=1)
    (france,) = facts.records
    assert france.prompts == ("The capital of France is",)  # subject inside, file order, capped
    assert france.heldout_prompts == ("France's capital is", "France has the capital")
    assert [(s.relation, s.reason, s.detail) for s in facts.skipped] == [
        ("P17", "relation has no subject-first split", "every pattern begins with it")]
    random_split = load_pararel(root, heldout_fraction=0.5)  # the default split is unchanged by the option
    assert {r.relation for r in random_split.records} == {"P36", "P17"}
    with pytest.raises(DataError, match="heldout must be one of random, subject_first"):
        split_patterns(["[X] is [Y]"], "P1", 0.3, 0, heldout="first")


def test_the_subject_first_split_is_a_checked_data_setting(tmp_path):
    from helpers import tiny_config
    from kn_edit.errors import ConfigError

    with pytest.raises(ConfigError, match="data.heldout must be random or subject_first, got 'first'"):
        tiny_config(tmp_path, **{"data.heldout": "first"}).check()
    with pytest.raises(ConfigError, match="needs data.source=pararel"):
        tiny_config(tmp_path, **{"data.heldout": "subject_first", "data.source": "known1000"}).check()
    tiny_config(tmp_path, **{"data.heldout": "subject_first"}).check()
