"""Evaluation scripts: batch_edit.py: --append (another method's rows beside the earlier ones, on the same facts only), --set values,
MEMIT's refit count; rome_check.py's --facts-from (the facts of an earlier run, not selected again); edit_rules.py's
config names."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "evaluations" / "batch_edit.py"


# ----- evaluations/batch_edit.py --append: another method's rows beside the earlier ones --------------------
def _batch_script():
    spec = importlib.util.spec_from_file_location("batch_edit", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _batch_meta(ids: list[str], ppl: float = 12.3) -> dict:
    return {"facts": [{"fact_id": i} for i in ids], "base_ppl": ppl, "argv": "--facts 2", "settings": {"memit": {}},
            "seconds": 100.0}  # fmt: skip


def test_batch_append_keeps_other_methods_and_refuses_other_facts(tmp_path):
    script = _batch_script()
    path = tmp_path / "batch_edit.json"
    summary = {"memit": {"batch": {"success": 0.5}}, "kn-subject": {"batch": {"success": 0.1}, "single": {"success": 1.0}}}
    path.write_text(json.dumps({"meta": _batch_meta(["a", "b"]), "summary": summary, "raw": summary}))
    now = {**_batch_meta(["a", "b"]), "argv": "--facts 2 --methods kn-subject --append", "settings": {"kn-subject": {}}}
    results, raw, meta = script.earlier_results(path, now, ["kn-subject"], ["batch", "single"])
    assert results == {"memit": {"batch": {"success": 0.5}}} and raw == results  # the rerun method is dropped
    results, _, _ = script.earlier_results(path, now, ["kn-subject"], ["batch"])  # only its batch way is rerun
    assert results == {"memit": {"batch": {"success": 0.5}}, "kn-subject": {"single": {"success": 1.0}}}
    assert meta["settings"] == {"memit": {}, "kn-subject": {}} and meta["seconds"] == 100.0
    assert "--facts 2` and `" not in meta["argv"] and meta["argv"].endswith("`, then `--facts 2 --methods kn-subject --append")
    with pytest.raises(SystemExit, match="other facts"):
        script.earlier_results(path, _batch_meta(["a", "c"]), ["kn-subject"], ["batch"])
    with pytest.raises(SystemExit, match="other facts"):
        script.earlier_results(path, _batch_meta(["a", "b"], ppl=12.0), ["kn-subject"], ["batch"])
    # the same text measured on another CPU: equal to 1e-4, so the rows are joined
    assert script.earlier_results(path, _batch_meta(["a", "b"], ppl=12.3 * (1 + 1e-5)), ["kn-subject"], ["batch"])[0]


def test_batch_memo_keys_on_the_whole_group_of_requests():
    """MemoTargets reuses a per-fact step only for the very same arguments: kn-subject's step takes one subject's
    requests together (one δ for them all), so a fact edited alone is not served its batch group's result."""
    import dataclasses

    from kn_edit.editing import EditRequest

    script = _batch_script()

    @dataclasses.dataclass
    class Found:
        subjects: tuple

    class Editor:
        calls = 0

        def _prepare(self, km, layer, prefixes, whole, requests):
            Editor.calls += 1
            return [Found(tuple(r.subject for r in requests)) for _ in requests]

    a = EditRequest(("France's capital is",), "Paris", "Rome", subject="France")
    b = EditRequest(("France's language is",), "French", "German", subject="France")
    editor, memo = Editor(), script.MemoTargets("_prepare")
    memo.wrap(editor)
    group = editor._prepare(None, 5, [""], True, [a, b])
    assert group == [Found(("France", "France"))] * 2 and Editor.calls == 1
    again = editor._prepare(None, 5, [""], True, [a, b])
    assert again == group and again[0] is not group[0] and Editor.calls == 1  # reused, as copies
    assert editor._prepare(None, 5, [""], True, [a]) == [Found(("France",))] and Editor.calls == 2
    assert editor._prepare(None, 6, [""], True, [a]) and Editor.calls == 3  # another layer: computed afresh


def test_batch_settings_parse_json_values_and_strings():
    script = _batch_script()
    assert script.setting("memit:refit=null") == ("memit", "refit", None)
    assert script.setting("memit:refit=prompts") == ("memit", "refit", "prompts")
    assert script.setting("memit:mom2_update_weight=150") == ("memit", "mom2_update_weight", 150)
    assert script.setting("memit:layers=[4,5]") == ("memit", "layers", [4, 5])
    for bad in ("nope:refit=null", "memit:refit", "memit:=3"):
        with pytest.raises(SystemExit, match="METHOD:KEY=VALUE"):
            script.setting(bad)


def test_batch_report_counts_memit_refits():
    """The facts MEMIT solved again: counted from its report's ``refitted`` (None for other methods) and listed
    under the table."""
    script = _batch_script()
    report = lambda found: SimpleNamespace(details=SimpleNamespace(refitted=found))  # noqa: E731
    assert script.refitted(report([0, 3])) == 2 and script.refitted(report([])) == 0
    assert script.refitted(SimpleNamespace(details=SimpleNamespace())) is None
    row = {"success": 1.0, "heldout_top1": 0.5, "same_kept": 1.0, "n_same": 2, "other_kept": 1.0, "n_other": 2,
           "ppl_change": 0.0, "seconds": 1.0, "refused": 0}
    meta = {"n_facts": 4, "relations": ["P36"], "prompts": 3, "text_passages": 2, "text_tokens": 8, "base_ppl": 9.0,
            "argv": "--facts 4", "settings": {}, "seconds": 2.0, "threads": 1}
    text = script.markdown(meta, {"memit": {"batch": {**row, "refitted": 2}}, "kn": {"batch": {**row, "refitted": None}}})
    assert "solved again (`refit`, the first solve left them short): memit batch: 2 of 4." in text
    assert "kn batch:" not in text


# ----- evaluations/rome_check.py --facts-from: an earlier run's facts and neighbours, not selected again -------
def _facts_file(path: Path, model: str = "smollm2-135m", facts: list | None = None) -> Path:
    fact = {"fact_id": "P36:abc", "subject": "France", "old": "Paris", "new": "Rome",
            "prompts": ["The capital of France is"], "heldout": ["France's capital is"],
            "same": [], "other": [["Scotland's capital city is", "Edinburgh"]]}  # fmt: skip
    path.write_text(json.dumps({"meta": {"model": model, "facts": [fact] if facts is None else facts}, "raw": {}}))
    return path


def test_facts_from_gives_the_facts_as_the_selection_does(tmp_path):
    _batch_script()  # puts evaluations/ on sys.path
    import rome_check

    facts = rome_check.facts_from(_facts_file(tmp_path / "run.json"), "smollm2-135m")
    assert facts == [{"fact_id": "P36:abc", "relation": "P36", "subject": "France", "old": "Paris", "new": "Rome",
                      "prompts": ["The capital of France is"], "heldout": ["France's capital is"], "same": [],
                      "other": [("Scotland's capital city is", "Edinburgh")]}]  # fmt: skip
    # request_of builds the edit request the scripts edit from it
    request = _batch_script().request_of(facts[0])
    assert (request.relation, request.subject, request.old, request.new) == ("P36", "France", "Paris", "Rome")


def test_facts_from_refuses_another_models_facts_and_malformed_files(tmp_path):
    _batch_script()
    import rome_check

    with pytest.raises(SystemExit, match="selected on gemma3-270m, not smollm2-135m"):
        rome_check.facts_from(_facts_file(tmp_path / "a.json", model="gemma3-270m"), "smollm2-135m")
    with pytest.raises(SystemExit, match="meta.facts is empty"):
        rome_check.facts_from(_facts_file(tmp_path / "b.json", facts=[]), "smollm2-135m")
    with pytest.raises(SystemExit, match="not a results file with meta.facts"):
        rome_check.facts_from(_facts_file(tmp_path / "c.json", facts=[{"fact_id": "P36:x"}]), "smollm2-135m")
    (tmp_path / "d.json").write_text("{not json")
    with pytest.raises(SystemExit, match="not a results file"):
        rome_check.facts_from(tmp_path / "d.json", "smollm2-135m")
    with pytest.raises(SystemExit, match="not a results file"):
        rome_check.facts_from(tmp_path / "missing.json", "smollm2-135m")


def test_edit_rules_refuses_an_unknown_config_before_any_work(monkeypatch):
    _batch_script()
    import edit_rules

    monkeypatch.setattr(sys, "argv", ["edit_rules.py", "--configs", "kn-subject (64 neurons at the subject; layer 5),nope"])
    monkeypatch.setattr(edit_rules.kn_edit, "load", lambda *a, **k: pytest.fail("loaded a model"))
    with pytest.raises(SystemExit, match=r"unknown --configs \['nope'\]; choose from: .*kn-subject \(256 neurons\)"):
        edit_rules.main()
    assert all("," not in name for name in edit_rules.CONFIGS)  # --configs is comma-separated


def test_edit_rules_object_slot_next_is_the_unedited_top1_among_the_objects_first_tokens(tiny_factory):
    import torch

    _batch_script()
    import edit_rules

    km = tiny_factory("llama")

    def top1(prompt: str) -> int:
        ids = km.tokenizer(prompt, add_special_tokens=True)["input_ids"]
        with torch.no_grad():
            return int(km.model(input_ids=torch.tensor([ids])).logits[0, -1].argmax())

    # On this tiny model "Danielle Darrieux was born in" continues with " Rome" (asserted), "Tokyo is a" with " the"
    # and "The capital of France is" with a byte piece.
    prompts = ["Danielle Darrieux was born in", "Tokyo is a", "The capital of France is"]
    assert top1(prompts[0]) == km.encode(prompts[0], "Rome").steps[0].target_id
    assert top1(prompts[1]) == km.encode(prompts[1], "the").steps[0].target_id
    assert edit_rules.object_slot_next(km, prompts, ["Paris", "Rome", "Berlin"]) == [True, False, False]
    assert edit_rules.object_slot_next(km, prompts, ["Paris", "Berlin"]) == [False, False, False]
    assert edit_rules.object_slot_next(km, prompts, []) == [False, False, False]
    # an object the tokenizer cannot express (empty) is passed over, also when it comes first
    assert edit_rules.object_slot_next(km, prompts, ["", "Rome"]) == [True, False, False]
