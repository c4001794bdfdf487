"""Results as data: every results folder of ``evaluate`` / ``compare`` carries a manifest (code, command, config,
dates, machine); ``compare`` mode=batch (N facts in one edit beside N single edits, measured by the same code);
``compare --progress`` (what a comparison has kept so far, computing nothing), its ``--report`` folder and
``--merge`` (an earlier report's methods joined)."""

from __future__ import annotations

import hashlib
import json
import sys

import pytest
import torch

from helpers import PASSAGES, SUBJECTS, assert_same, snapshot, tiny_config, tiny_facts, tiny_sized, write_capital_facts
from kn_edit.cli import main
from kn_edit.editing.registry import make_editor
from kn_edit.evaluation import evaluate
from kn_edit.evaluation.compare import compare_methods, parts_dir
from kn_edit.errors import ConfigError
from kn_edit.evaluation.config import CompareConfig, MethodEntry, Mode
from kn_edit.evaluation.datamodule import FactDataModule
from kn_edit.evaluation.report import fmt
from kn_edit.storage import manifest

VV = MethodEntry("helpers:ValueVectorEditor", label="vv", settings={"scale": 10.0})
KN = MethodEntry("kn-unscaled", settings={"force": True, "steps": 2, "generic_filter": False})


def batch_config(tmp_path, methods=(VV,), **data) -> CompareConfig:
    config = tiny_sized(CompareConfig(name="batch", output_dir=str(tmp_path), run_name="cmp", methods=list(methods),
                                      mode=Mode.batch))  # fmt: skip
    for key, value in data.items():
        setattr(config.data, key, value)
    return config


def _without_clock(value):
    """A row or metrics with the clock (seconds, per-phase timings) and memory readings and the probe left out (the batch way does not probe)."""
    if isinstance(value, dict):
        return {k: _without_clock(v) for k, v in value.items()
                if not (k in ("seconds", "timings", "peak_memory_mb", "probe", "probe_error") or "seconds" in k or "memory" in k
                        or k.startswith("probe/"))}  # fmt: skip
    if isinstance(value, list):
        return [_without_clock(v) for v in value]
    return value


# ----- the manifest -----------------------------------------------------------------------------------------
def _check_manifest(folder, kind: str) -> dict:
    found = json.loads((folder / "manifest.json").read_text())
    assert found["kind"] == kind and found["command"] == sys.argv and found["config"] == "config.yaml"
    assert found["config_sha256"] == hashlib.sha256((folder / "config.yaml").read_bytes()).hexdigest()
    assert found["kn_edit_version"] and found["started"] <= found["finished"]
    assert found["machine"]["torch_threads"] == torch.get_num_threads() and found["machine"]["device"] == "cpu"
    # this checkout is a git work tree: its commit, and whether a tracked file differs from it
    assert len(found["commit"]) == 40 and isinstance(found["dirty"], bool)
    return found


def test_evaluate_and_compare_write_a_manifest(tiny_factory, tmp_path):
    km = tiny_factory("llama")
    run = evaluate(tiny_config(tmp_path, **{"probe.enabled": False}), km=km, editor=make_editor("helpers:ValueVectorEditor"),
                   facts=tiny_facts(), passages=PASSAGES)  # fmt: skip
    assert _check_manifest(run.run_dir, "evaluate")["model"] == km.name
    config = tiny_sized(CompareConfig(name="c", output_dir=str(tmp_path), run_name="cmp", methods=[VV]))
    config.probe.enabled = False
    result = compare_methods(config, km=km, facts=tiny_facts(), passages=PASSAGES)
    assert _check_manifest(result.run_dir, "compare")["reused_parts"] == []
    config.resume, config.run_name = True, "again"  # the method's kept result is reused: the manifest says so
    again = compare_methods(config, km=km, facts=tiny_facts(), passages=PASSAGES)
    assert _check_manifest(again.run_dir, "compare")["reused_parts"] == ["vv"]


def test_code_outside_a_checkout_has_no_commit(tmp_path, monkeypatch):
    monkeypatch.setattr(manifest, "CODE_ROOT", tmp_path)
    state = manifest.code_state()
    assert state["commit"] is None and state["dirty"] is None and state["kn_edit_version"]


# ----- mode: batch --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.parametrize("method", [VV, KN], ids=["value-vector", "kn"])
def test_a_batch_of_one_fact_is_the_single_edit(tiny_factory, tmp_path, family, method):
    km = tiny_factory(family)
    before = snapshot(km)
    result = compare_methods(batch_config(tmp_path, [method], max_facts=1), km=km, facts=tiny_facts(), passages=PASSAGES)
    title = method.title
    assert list(result.results) == [f"{title}/batch", f"{title}/single"]
    batch, single = result.results[f"{title}/batch"], result.results[f"{title}/single"]
    assert len(batch.rows) == len(single.rows) == 1
    assert _without_clock(batch.rows) == _without_clock(single.rows)
    assert _without_clock(batch.metrics) == pytest.approx(_without_clock(single.metrics), rel=0, abs=0, nan_ok=True)
    assert_same(km, before)
    report = (result.run_dir / "report.md").read_text()
    assert f"| {title}/batch |" in report and f"| {title}/single |" in report


def test_a_batch_of_n_facts_is_one_edit_measured_per_fact(tiny_factory, tmp_path):
    km = tiny_factory("llama")
    before = snapshot(km)
    config = batch_config(tmp_path, [VV], max_facts=4)
    result = compare_methods(config, km=km, facts=tiny_facts(), passages=PASSAGES)
    batch, single = result.results["vv/batch"], result.results["vv/single"]
    assert [r["fact_id"] for r in batch.rows] == [r["fact_id"] for r in single.rows] and len(batch.rows) == 4
    assert set(batch.metrics) == {k for k in single.metrics if not k.startswith("probe/")}
    assert batch.summary["mode"] == "batch"
    # one edit: its report (seconds, memory) is counted once, at the first fact
    assert [r["editor"]["report"] is not None for r in batch.rows] == [True, False, False, False]
    assert batch.metrics["edit/seconds"] == pytest.approx(batch.rows[0]["editor"]["report"]["seconds"])
    assert_same(km, before)
    # each fact's numbers are those of the model with every fact's edit in place, computed plainly
    datamodule = FactDataModule(km, config.data, facts=tiny_facts())
    datamodule.setup("test")
    edit = make_editor("helpers:ValueVectorEditor", overrides={"scale": 10.0}).apply(km, [c.request for c in datamodule.cases])
    try:
        for case, row in zip(datamodule.cases, batch.rows):
            p_new = [km.prob(p, case.new) for p in case.fact.prompts]
            assert row["edit"]["p_new_after"] == pytest.approx(sum(p_new) / len(p_new), rel=1e-4)
            top1 = [km.predict(p, top_k=1)[0].token.strip() == case.new for p in case.fact.prompts]
            if len(km.encode(case.fact.prompts[0], case.new).steps) == 1:  # one answer token: top-1 is argmax
                assert row["edit"]["top1"] == pytest.approx(sum(top1) / len(top1))
        nll_after = [row["text_ppl"]["after"] for row in batch.rows]
        assert len(set(nll_after)) == 1  # one edit: one text measurement
    finally:
        edit.revert()
    assert_same(km, before)


def test_a_refused_batch_counts_every_fact_as_a_failed_edit(tiny_factory, tmp_path):
    km = tiny_factory("llama")
    refusing = MethodEntry("helpers:ValueVectorEditor", label="vv", settings={"fail_on": ["Italy"]})
    result = compare_methods(batch_config(tmp_path, [refusing], max_facts=3), km=km, facts=tiny_facts(), passages=PASSAGES)
    batch, single = result.results["vv/batch"], result.results["vv/single"]
    assert all("refusing to edit Italy" in r["error"] for r in batch.rows) and batch.metrics["run/edit_errors"] == 3
    assert single.metrics["run/edit_errors"] == 1
    for row in batch.rows:  # the model was left unchanged: after = before
        assert row["edit"]["p_new_after"] == row["edit"]["p_new_before"]
        assert row["edit"]["p_old_after"] == row["edit"]["p_old_before"]


def test_batch_ways_are_kept_and_resumed_as_parts(tiny_factory, tmp_path):
    km = tiny_factory("llama")
    config = batch_config(tmp_path, [VV], max_facts=2)
    first = compare_methods(config, km=km, facts=tiny_facts(), passages=PASSAGES)
    assert sorted(p.name for p in parts_dir(config).glob("*.json")) == ["vv_batch.json", "vv_single.json"]
    config.resume, config.run_name = True, "again"
    again = compare_methods(config, km=km, facts=tiny_facts(), passages=PASSAGES)
    assert again.reused == ["vv/batch", "vv/single"]
    assert again.flat_metrics() == pytest.approx(first.flat_metrics(), rel=0, abs=0, nan_ok=True)


def test_batch_ways_batch_only_measures_the_batch_way_alone(tiny_factory, tmp_path):
    """batch_ways=[batch] (a sweep of batch settings): only the batch way runs, with the very metrics it has beside
    the single way, and resume keys it the same."""
    km = tiny_factory("llama")
    both = compare_methods(batch_config(tmp_path / "both", [VV], max_facts=2), km=km, facts=tiny_facts(), passages=PASSAGES)
    config = batch_config(tmp_path / "one", [VV], max_facts=2)
    config.batch_ways = ["batch"]
    alone = compare_methods(config, km=km, facts=tiny_facts(), passages=PASSAGES)
    assert list(alone.results) == ["vv/batch"]
    assert sorted(p.name for p in parts_dir(config).glob("*.json")) == ["vv_batch.json"]
    got, want = (_without_clock(r.results["vv/batch"].metrics) for r in (alone, both))
    assert got.keys() == want.keys() and got == pytest.approx(want, rel=0, abs=0, nan_ok=True)
    # batch_ways is not part of a kept method's key: a batch-only run resumes the both-ways run's batch part
    config.output_dir, config.resume, config.run_name = str(tmp_path / "both"), True, "again"
    again = compare_methods(config, km=km, facts=tiny_facts(), passages=PASSAGES)
    assert again.reused == ["vv/batch"]


@pytest.mark.parametrize("ways", [[], ["single", "single"], ["batched"]])
def test_batch_ways_must_name_each_way_once(tmp_path, ways):
    config = batch_config(tmp_path, [VV])
    config.batch_ways = ways
    with pytest.raises(ConfigError, match="batch_ways"):
        config.check()


@pytest.mark.parametrize("mode", ["single", "sequential"])
def test_batch_ways_outside_mode_batch_is_an_error_not_ignored(tmp_path, mode):
    config = batch_config(tmp_path, [VV])
    config.mode, config.batch_ways = mode, ["batch"]
    with pytest.raises(ConfigError, match="mode=batch only"):
        config.check()
    config.batch_ways = ["batch", "single"]  # the default: nothing to ignore
    config.check()


def test_evaluate_mode_batch_is_the_batch_way(tiny_factory, tmp_path):
    km = tiny_factory("llama")
    config = tiny_config(tmp_path, **{"probe.enabled": False, "data.max_facts": 3})
    config.mode = Mode.batch
    run = evaluate(config, km=km, editor=make_editor("helpers:ValueVectorEditor"), facts=tiny_facts(), passages=PASSAGES)
    assert len(run.rows) == 3 and run.summary["mode"] == "batch"
    assert (run.run_dir / "manifest.json").is_file()


# ----- compare --progress -------------------------------------------------------------------------------------
def _seq_config(tmp_path, name: str = "seq", labels=("vv", "other")):
    """A sequential comparison's config file (JSON is YAML) over the tiny model saved at tmp_path / "model" (only
    a run needs it) and three facts."""
    config = tmp_path / f"{name}.yaml"
    config.write_text(json.dumps({
        "name": name, "mode": "sequential", "checkpoints": [1, 2, 3], "model": str(tmp_path / "model"),
        "data": {"source": "jsonl", "path": str(write_capital_facts(tmp_path / "facts.jsonl", SUBJECTS[:3])),
                 "only_known": False, "neighbours": 1},
        "text": {"source": "none"}, "fluency": {"enabled": False}, "probe": {"enabled": False},
        "trainer": {"accelerator": "cpu"}, "output_dir": str(tmp_path / "runs"),
        "methods": [{"method": "helpers:ValueVectorEditor", "label": label, "settings": {"scale": 1.0 + i}}
                    for i, label in enumerate(labels)]}, indent=1))  # fmt: skip
    return config


def _no_model(monkeypatch):
    import kn_edit.models.loading as loading

    monkeypatch.setattr(loading, "load", lambda *a, **k: pytest.fail("--progress loaded a model"))


def test_compare_progress_prints_what_is_kept_without_computing(tiny_factory, tmp_path, capsys, monkeypatch):
    tiny_factory("llama").save(tmp_path / "model")
    config = _seq_config(tmp_path)
    assert main(["compare", "--quiet", "--config", str(config), "run_name=one", "methods=[{method: 'helpers:ValueVectorEditor', label: vv, settings: {scale: 1.0}}]"]) == 0
    parts = tmp_path / "runs" / ".seq.parts"
    curve = json.loads((tmp_path / "runs" / "one" / "curves.json").read_text())["vv"]
    capsys.readouterr()
    _no_model(monkeypatch)
    assert main(["compare", "--config", str(config), "--progress"]) == 0
    out = capsys.readouterr().out
    assert "finished" in out and "nothing kept yet" in out and "edits applied one after another" in out
    assert fmt(curve[-1]["edits/held"]) in out and fmt(curve[1]["edits/top1"]) in out
    # a stopped run: only its progress file, two of three edits made
    (parts / "vv.json").unlink()
    progress = json.loads((parts / "vv.progress.json").read_text())
    progress["curve"], progress["edits_made"] = progress["curve"][:3], 2
    (parts / "vv.progress.json").write_text(json.dumps(progress))
    assert main(["compare", "--config", str(config), "--progress"]) == 0
    assert "at edit 2" in capsys.readouterr().out


def test_compare_progress_report_writes_what_sequential_progress_wrote(tiny_factory, tmp_path, capsys, monkeypatch):
    """--report writes the folder that evaluations/sequential_progress.py wrote (its content written out here
    plainly): curves.json, facts-METHOD.jsonl, report.md, config.yaml, curves.png; and a manifest."""
    tiny_factory("llama").save(tmp_path / "model")
    config = _seq_config(tmp_path)
    assert main(["compare", "--quiet", "--config", str(config), "run_name=one",
                 "methods=[{method: 'helpers:ValueVectorEditor', label: vv, settings: {scale: 1.0}}]"]) == 0
    kept = json.loads((tmp_path / "runs" / ".seq.parts" / "vv.json").read_text())
    _no_model(monkeypatch)
    out = tmp_path / "report"
    assert main(["compare", "--config", str(config), "--progress", "--report", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["config.yaml", "curves.json", "curves.png", "facts-vv.jsonl",
                                                     "manifest.json", "report.md"]  # fmt: skip
    curve = [{"n_edits": c["n_edits"], **c["metrics"]} for c in kept["curve"]]
    assert [c["n_edits"] for c in curve] == [0, 1, 2, 3]
    assert (out / "curves.json").read_text() == json.dumps({"vv": curve}, indent=1)
    assert (out / "facts-vv.jsonl").read_text() == "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in kept["rows"])
    assert (out / "config.yaml").read_text() == config.read_text()
    columns = ["edits/held", "edits/top1", "generalization/top1", "intra/retained", "inter/retained", "drift/change",
               "fluency/entropy", "edits/refused"]  # fmt: skip
    table = ["| " + " | ".join([str(c["n_edits"])] + [fmt(c.get(k)) for k in columns]) + " |" for c in curve]
    expected = "\n".join([
        "# Sequential comparison `seq`: what each method measured", "",
        "| method | edits made | of | status | wall seconds |", "| --- | --- | --- | --- | --- |",
        f"| `vv` | 3 | 3 | finished | {kept['summary']['seconds']} |", "",
        "Each table row is a checkpoint (edits made so far); a stopped method has no rows past the last checkpoint it "
        "reached. The edits are reverted at the end of a finished run (checked bit for bit); a stopped run's process "
        "ended with them.", "",
        "## Sequential edits: `vv`", "",
        "| edits | edits still held | edit prompts top-1 | paraphrases top-1 | same relation kept | other relations kept "
        "| text ppl change | fluency | refused |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |", *table, "",
        "![curves](curves.png)", "", "## Configuration", "", "```yaml", config.read_text().rstrip(), "```", ""])  # fmt: skip
    assert (out / "report.md").read_text() == expected
    found = json.loads((out / "manifest.json").read_text())  # no model: no device in it
    assert found["kind"] == "compare-progress" and found["machine"]["device"] is None and found["methods_from_merge"] == []
    assert found["config_sha256"] == hashlib.sha256(config.read_bytes()).hexdigest() and len(found["commit"]) == 40
    assert "wrote" in capsys.readouterr().out
    # an override that changes what is computed: config.yaml is the resolved config, not the file
    assert main(["compare", "--config", str(config), "--progress", "--report", str(tmp_path / "r2"), "checkpoints=[1,3]"]) == 0
    assert "checkpoints:\n- 1\n- 3" in (tmp_path / "r2" / "config.yaml").read_text()


def _curve(held: float, planned: int) -> list[dict]:
    return [{"n_edits": 0, "intra/retained": 1.0, "inter/retained": 1.0, "drift/change": 0.0},
            {"n_edits": planned, "edits/held": held, "edits/top1": held, "intra/retained": 0.5,
             "inter/retained": 0.6, "drift/change": 0.1}]  # fmt: skip


def _write_parts(parts, method: str, held: float, made: int, planned: int) -> None:
    parts.mkdir(parents=True, exist_ok=True)
    payload = {"curve": _curve(held, made), "rows": [{"order": i + 1, "method": method} for i in range(made)],
               "edits_made": made, "edits_planned": planned, "seconds": 12.5, "written": "now"}  # fmt: skip
    (parts / f"{method}.progress.json").write_text(json.dumps(payload))


def _report(config, out, *more: str) -> int:
    return main(["compare", "--config", str(config), "--progress", "--report", str(out), *more])


def test_merge_joins_an_earlier_reports_methods_and_keeps_their_rows_and_seconds(tmp_path, monkeypatch):
    _no_model(monkeypatch)
    runs = tmp_path / "runs"
    earlier, out = tmp_path / "earlier", tmp_path / "out"
    _write_parts(runs / ".old.parts", "rome", held=0.9, made=3, planned=3)
    _write_parts(runs / ".old.parts", "kn", held=0.2, made=3, planned=3)
    assert _report(_seq_config(tmp_path, "old", ["rome", "kn"]), earlier) == 0
    _write_parts(runs / ".run.parts", "memit", held=1.0, made=2, planned=3)  # stopped early
    _write_parts(runs / ".run.parts", "kn", held=0.4, made=3, planned=3)  # a rerun: replaces the earlier report's kn
    config = _seq_config(tmp_path, "run", ["memit", "kn", "rome"])
    assert _report(config, out, "--merge", str(earlier)) == 0

    curves = json.loads((out / "curves.json").read_text())
    assert list(curves) == ["rome", "memit", "kn"]  # the earlier report's first, then the comparison's own
    assert curves["rome"] == json.loads((earlier / "curves.json").read_text())["rome"]
    assert curves["kn"][-1]["edits/held"] == 0.4
    rome_rows = (out / "facts-rome.jsonl").read_text().splitlines()
    assert [json.loads(r)["order"] for r in rome_rows] == [1, 2, 3]
    report = (out / "report.md").read_text()
    assert "| `rome` | 3 | 3 | finished | 12.5 |" in report
    assert "| `memit` | 2 | 3 | stopped after edit 2 | 12.5 |" in report
    assert json.loads((out / "manifest.json").read_text())["methods_from_merge"] == ["rome"]


def test_merge_into_the_same_folder_keeps_the_earlier_methods(tmp_path, monkeypatch):
    _no_model(monkeypatch)
    report = tmp_path / "report"
    _write_parts(tmp_path / "runs" / ".old.parts", "rome", held=0.9, made=3, planned=3)
    assert _report(_seq_config(tmp_path, "old", ["rome"]), report) == 0
    _write_parts(tmp_path / "runs" / ".run.parts", "memit", held=1.0, made=3, planned=3)
    config = _seq_config(tmp_path, "run", ["memit"])
    assert _report(config, report, "--merge", str(report)) == 0  # the --merge folder may be rewritten
    assert sorted(json.loads((report / "curves.json").read_text())) == ["memit", "rome"]
    assert not list(tmp_path.glob(".report*"))  # no temporary folder left


def test_report_refuses_an_existing_folder_and_a_merge_from_no_report(tmp_path, monkeypatch, capsys):
    _no_model(monkeypatch)
    _write_parts(tmp_path / "runs" / ".run.parts", "memit", held=1.0, made=3, planned=3)
    config = _seq_config(tmp_path, "run", ["memit"])
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "mine.txt").write_text("keep")
    assert _report(config, tmp_path / "taken") == 2
    assert "already exists" in capsys.readouterr().err and (tmp_path / "taken" / "mine.txt").read_text() == "keep"
    assert _report(config, tmp_path / "o", "--merge", str(tmp_path / "taken")) == 2
    assert "holds no curves.json" in capsys.readouterr().err and not (tmp_path / "o").exists()
    assert main(["compare", "--config", str(config), "--report", str(tmp_path / "o")]) == 2
    assert "go with --progress" in capsys.readouterr().err
    assert _report(_seq_config(tmp_path, "empty", ["kn"]), tmp_path / "o") == 2
    assert "nothing to report" in capsys.readouterr().err and not (tmp_path / "o").exists()
    assert _report(config, tmp_path / "taken", "--overwrite") == 0  # replaced as a whole
    assert sorted(p.name for p in (tmp_path / "taken").iterdir()) == ["config.yaml", "curves.json", "curves.png",
                                                                       "facts-memit.jsonl", "manifest.json", "report.md"]  # fmt: skip


def test_kept_methods_reads_only_the_named_methods(tmp_path):
    from kn_edit.evaluation.kept import kept_methods

    payload = {"curve": [{"n_edits": 1, "edits/held": 1.0}], "rows": [{}], "edits_made": 1, "edits_planned": 4,
               "seconds": 3.0, "written": "now"}  # fmt: skip
    for name in ("a", "b"):
        (tmp_path / f"{name}.progress.json").write_text(json.dumps(payload))
    found = kept_methods(tmp_path, ["a"])
    assert list(found) == ["a"] and found["a"]["finished"] is False and found["a"]["edits_planned"] == 4
