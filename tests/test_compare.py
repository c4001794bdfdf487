"""`kn-edit compare` / compare_methods on a tiny model: every method on the same requests, every metric in the
report, and each method's numbers equal to its own evaluation run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from helpers import PASSAGES, tiny_facts, tiny_sized, write_capital_facts
from kn_edit.cli import main
from kn_edit.evaluation import evaluate
from kn_edit.evaluation.compare import COLUMNS, compare_methods, eval_config_for
from kn_edit.editing.registry import make_editor
from kn_edit.evaluation.config import CompareConfig, MethodEntry

TINY_METHODS = [
    MethodEntry("kn-unscaled", settings={"force": True, "steps": 2, "generic_filter": False}),
    MethodEntry("helpers:ValueVectorEditor", label="value-vector", settings={"scale": 10.0}),
]


def tiny_compare_config(tmp_path) -> CompareConfig:
    return tiny_sized(CompareConfig(name="tiny", output_dir=str(tmp_path), run_name="cmp", methods=list(TINY_METHODS)))


def test_compare_runs_every_method_on_the_same_requests(tiny_factory, tmp_path):
    km = tiny_factory("llama")
    config = tiny_compare_config(tmp_path)
    result = compare_methods(config, km=km, facts=tiny_facts(), passages=PASSAGES)
    assert list(result.results) == ["kn-unscaled", "value-vector"]
    facts = [[r["fact_id"] for r in res.rows] for res in result.results.values()]
    assert facts[0] == facts[1] and len(facts[0]) == len(tiny_facts().records)
    # the same numbers as an evaluation of that method alone
    # (the second method reads the unedited model's measurements the first one made: the comparison shares them)
    alone = evaluate(eval_config_for(config, TINY_METHODS[1]), km=km, facts=tiny_facts(), passages=PASSAGES, write=False)
    shared = result.results["value-vector"].metrics
    assert set(shared) == set(alone.metrics)
    for key in shared:
        if "seconds" not in key and "memory" not in key:
            assert shared[key] == pytest.approx(alone.metrics[key], nan_ok=True), key
    run = result.run_dir
    payload = json.loads((run / "metrics.json").read_text())
    assert set(payload["methods"]) == {"kn-unscaled", "value-vector"}
    for title in payload["methods"]:
        for key, _ in COLUMNS:
            assert key in payload["methods"][title], (title, key)
            assert f"{title}:{key}" in payload["metrics"]
    report = (run / "report.md").read_text()
    assert "| kn-unscaled |" in report and "| value-vector |" in report and "methods.png" in report
    assert (run / "methods.png").is_file() and (run / "facts-value-vector.jsonl").is_file()


def test_compare_command_and_its_gate(tiny_factory, tmp_path, capsys):
    model, folder = tiny_factory("llama"), tmp_path / "model"
    model.save(folder)
    facts = write_capital_facts(tmp_path / "facts.jsonl", [("France", "Paris"), ("Italy", "Rome"), ("Japan", "Tokyo")])
    config = tmp_path / "cmp.yaml"
    config.write_text(f"""
name: cli
model: {folder}
data: {{source: jsonl, path: {facts}, only_known: false, neighbours: 1}}
text: {{source: none}}
probe: {{enabled: false}}
trainer: {{accelerator: cpu}}
output_dir: {tmp_path / "runs"}
methods:
  - {{method: kn-unscaled, settings: {{force: true, steps: 2, generic_filter: false}}}}
  - {{method: "helpers:ValueVectorEditor", label: vv}}
""")
    assert main(["compare", "--quiet", "--config", str(config), "run_name=one"]) == 0
    out = capsys.readouterr().out
    assert "kn-unscaled" in out and "vv" in out
    metrics = tmp_path / "runs" / "one" / "metrics.json"
    assert main(["compare", "--quiet", "--config", str(config), "run_name=two", f"regression.baseline={metrics}",
                 "regression.tolerances.vv:edit/top1=0.0"]) == 0
    flat = json.loads(metrics.read_text())["metrics"]
    (tmp_path / "better.json").write_text(json.dumps({"metrics": dict(flat, **{"vv:edit/top1": 2.0})}))
    assert main(["compare", "--quiet", "--config", str(config), "run_name=three",
                 f"regression.baseline={tmp_path / 'better.json'}", "regression.tolerances.vv:edit/top1=0.0"]) == 1
    assert "vv:edit/top1" in capsys.readouterr().out
    for bad, message in ((["methods=[]"], "at least one"), (["methods=[{method: romeo}]"], "unknown method"),
                         (["methods=[{method: kn}, {method: kn}]"], "labels must differ")):  # fmt: skip
        assert main(["compare", "--quiet", "--config", str(config)] + bad) == 2
        assert message in capsys.readouterr().err


def test_an_interrupted_comparison_resumes_from_its_finished_methods(tiny_factory, tmp_path, monkeypatch):
    import kn_edit.evaluation.compare as compare_module

    km = tiny_factory("llama")
    config = tiny_compare_config(tmp_path)
    config.plots = False
    real, calls = compare_module.evaluate, []

    def interrupted(eval_config, **kwargs):
        calls.append(eval_config.editor.method)
        if len(calls) == 2:
            raise KeyboardInterrupt  # the user stops the run during the second method
        return real(eval_config, **kwargs)

    monkeypatch.setattr(compare_module, "evaluate", interrupted)
    with pytest.raises(KeyboardInterrupt):
        compare_methods(config, km=km, facts=tiny_facts(), passages=PASSAGES)
    parts = compare_module.parts_dir(config)
    assert [p.name for p in parts.iterdir()] == ["kn-unscaled.json"]

    calls.clear()
    monkeypatch.setattr(compare_module, "evaluate", lambda c, **kw: calls.append(c.editor.method) or real(c, **kw))
    config.resume = True
    resumed = compare_methods(config, km=km, facts=tiny_facts(), passages=PASSAGES)
    assert calls == ["helpers:ValueVectorEditor"]  # the finished method is not run again
    assert sorted(p.name for p in parts.iterdir()) == ["kn-unscaled.json", "value-vector.json"]

    # the reused numbers are those of a fresh full run (all but the clock and memory readings)
    config.run_name, config.resume, calls[:] = "fresh", False, []
    fresh = compare_methods(config, km=km, facts=tiny_facts(), passages=PASSAGES)
    assert calls == ["kn-unscaled", "helpers:ValueVectorEditor"]
    measured = ("seconds", "memory")
    for title in fresh.results:
        ours, theirs = resumed.results[title].metrics, fresh.results[title].metrics
        assert set(ours) == set(theirs)
        for key in ours:
            if not any(m in key for m in measured):
                assert ours[key] == pytest.approx(theirs[key], nan_ok=True), (title, key)
        assert [r["fact_id"] for r in resumed.results[title].rows] == [r["fact_id"] for r in fresh.results[title].rows]

    # a part made under other settings is not reused, also when only an editor default changed
    entry = config.methods[0]
    inputs = compare_module.inputs_digest(km.name, ["case"], PASSAGES)
    key = lambda editor: compare_module.part_key(config, entry, editor, inputs)  # noqa: E731
    assert key(make_editor(entry.method, overrides=entry.settings)) == key(make_editor(entry.method, overrides=entry.settings))
    assert key(make_editor(entry.method, overrides=entry.settings)) != key(_with_default(entry.method, entry.settings))
    compare_module.save_part(parts / "kn-unscaled.json", "another key", fresh.results["kn-unscaled"])
    config.run_name, config.resume, calls[:] = "stale", True, []
    compare_methods(config, km=km, facts=tiny_facts(), passages=PASSAGES)
    assert calls == ["kn-unscaled"]  # the other method's part is still current


def _with_default(method: str, overrides: dict):
    """The registry's editor, with one default changed behind the config's back (a new release's default)."""
    editor = make_editor(method, overrides=overrides)
    if hasattr(editor.settings, "steps"):
        editor.settings.steps += 1
    else:
        editor.settings.scale = float(editor.settings.scale) + 1.0
    return editor


def test_runs_of_different_methods_are_joined_by_a_resumed_run(tiny_factory, tmp_path, monkeypatch):
    """Two runs of one comparison with a method each (e.g. in parallel), then one resume=true run over both:
    it evaluates nothing and reports both methods."""
    import kn_edit.evaluation.compare as compare_module

    km = tiny_factory("llama")
    config = tiny_compare_config(tmp_path)
    config.plots = False
    for i, method in enumerate(TINY_METHODS):
        part = tiny_compare_config(tmp_path)
        part.plots, part.methods, part.run_name = False, [method], f"part{i}"
        compare_methods(part, km=km, facts=tiny_facts(), passages=PASSAGES)
    calls = []
    real = compare_module.evaluate
    monkeypatch.setattr(compare_module, "evaluate", lambda c, **kw: calls.append(c.editor.method) or real(c, **kw))
    config.resume, config.run_name = True, "joined"
    joined = compare_methods(config, km=km, facts=tiny_facts(), passages=PASSAGES)
    assert calls == [] and list(joined.results) == ["kn-unscaled", "value-vector"]
    report = (joined.run_dir / "report.md").read_text()
    assert "| kn-unscaled |" in report and "| value-vector |" in report


@pytest.mark.parametrize("path", sorted((Path(__file__).resolve().parents[1] / "configs" / "compare").glob("*.yaml")),
                         ids=lambda p: p.name)
def test_every_committed_comparison_config_loads(path):
    """Each configs/compare/*.yaml is a valid CompareConfig whose methods are all registered."""
    from kn_edit.storage.config import load_config
    from kn_edit.editing.registry import method_config

    config = load_config(CompareConfig, [path]).check()
    assert config.methods
    for entry in config.methods:
        method_config(entry.method, overrides=dict(entry.settings))  # unknown methods or settings raise


def _gated_configs() -> list[Path]:
    """The committed comparison configs that gate (a regression baseline set), read as configs."""
    from kn_edit.storage.config import load_config

    paths = sorted((Path(__file__).resolve().parents[1] / "configs" / "compare").glob("*.yaml"))
    return [p for p in paths if load_config(CompareConfig, [p]).regression.baseline]


GATED = _gated_configs()


@pytest.mark.parametrize("path", GATED, ids=lambda p: p.name)
def test_every_gated_comparison_config_has_its_baseline(path):
    """A config that gates (regression.baseline set, as the CI gates are) names a committed baseline that holds
    every metric it has a tolerance for, each of a known direction: otherwise the gate would stop CI at its end."""
    from kn_edit.evaluation.regression import compare as compare_to_baseline, load_metrics
    from kn_edit.storage.config import load_config

    config = load_config(CompareConfig, [path]).check()
    assert config.regression.baseline
    baseline = load_metrics(Path(__file__).resolve().parents[1] / config.regression.baseline)
    tolerances = dict(config.regression.tolerances)
    assert tolerances and set(tolerances) <= set(baseline)
    assert compare_to_baseline(baseline, baseline, tolerances) == []  # directions known, the baseline passes itself


# ----- kept parts are checked before reuse: digest, fields, and metrics against the per-fact rows -------------
@pytest.fixture(scope="module")
def kept_parts(tmp_path_factory) -> tuple[Path, dict[str, dict]]:
    """A finished tiny comparison's parts folder and each kept part's payload, as written."""
    import kn_edit
    import kn_edit.evaluation.compare as compare_module
    from tiny_models import build_model

    tmp = tmp_path_factory.mktemp("kept")
    config = tiny_compare_config(tmp)
    config.plots = False
    compare_methods(config, km=kn_edit.wrap(*build_model("llama"), name="tiny-llama"), facts=tiny_facts(), passages=PASSAGES)
    parts = compare_module.parts_dir(config)
    return parts, {p.stem: json.loads(p.read_text()) for p in parts.glob("*.json")}


def _write_part(path: Path, payload: dict, redigest: bool = True) -> None:
    """``payload`` at ``path``; ``redigest``: with the digest of its (changed) content, as a careful forger would."""
    from kn_edit.evaluation.compare import _content_digest

    body = {k: v for k, v in payload.items() if k != "digest"}
    path.write_text(json.dumps(body | {"digest": _content_digest(body)} if redigest else payload, allow_nan=True))


def _set(section: str, path: str, value):
    """A change setting ``payload[section][a][b]...`` (``path`` "a|b|...", list indices as digits) to ``value``."""
    keys = [int(k) if k.isdigit() else k for k in path.split("|")]

    def change(payload: dict) -> None:
        target = payload[section]
        for key in keys[:-1]:
            target = target[key]
        target[keys[-1]] = value

    return change


# (id, change to a kept part, digest recomputed, what the reason names)
ALTERED = [
    ("number", _set("metrics", "edit/top1", 0.123456), False, "does not match its digest"),
    ("no-digest", lambda p: p.pop("digest"), False, "carries no digest"),
    ("number-redigested", _set("metrics", "edit/top1", 0.123456), True, "its edit/top1 is 0.123456, its rows give"),
    ("retention", _set("metrics", "inter/retained", 0.123456), True, "its inter/retained is 0.123456"),
    ("drift", _set("metrics", "drift/max_change", -0.5), True, "its drift/max_change is -0.5"),
    ("refused", _set("metrics", "run/edit_errors", 3.0), True, "its run/edit_errors is 3.0, its rows give 0.0"),
    ("seconds", _set("metrics", "edit/seconds", 1e-9), True, "its edit/seconds is 1e-09"),
    ("metric-dropped", lambda p: p["metrics"].pop("generalization/top1"), True, "its generalization/top1 is None"),
    ("probe-metric", _set("metrics", "probe/suppressed", 7.0), True, "its probe/suppressed is 7.0"),
    ("per-relation", _set("per_relation", "capital|edit/top1", 0.123456), True, "per-relation table does not follow"),
    ("probe-table", _set("probe_per_relation", "capital|suppressed", 7.0), True, "probe table does not follow"),
    ("row", _set("rows", "0|edit|top1", 0.5), True, "its rows give"),
    ("no-rows", lambda p: p.pop("rows"), True, "its 'rows' is missing or not a JSON list"),
    ("curve-null", lambda p: p.update(curve=None), True, "its 'curve' is missing or not a JSON list"),
    ("metrics-list", lambda p: p.update(metrics=[1, 2]), True, "its 'metrics' is missing or not a JSON dict"),
    ("row-without-relation", lambda p: p["rows"][0].pop("relation"), True, "malformed (KeyError: 'relation')"),
    ("row-not-an-object", lambda p: p["rows"].append(3), True, "rows or metrics are not what an evaluation writes"),
    ("checkpoint-string", lambda p: p.update(curve=[{"n_edits": "many", "metrics": {}}]), True, "malformed (ValueError"),
]  # fmt: skip


@pytest.mark.parametrize("case", ALTERED, ids=[c[0] for c in ALTERED])
def test_an_altered_or_malformed_kept_part_is_refused_with_its_reason(kept_parts, tmp_path, case):
    from kn_edit.evaluation.compare import UnusablePart, load_part

    _, change, redigest, reason = case
    payload = json.loads(json.dumps(kept_parts[1]["value-vector"]))
    change(payload)
    path = tmp_path / "value-vector.json"
    _write_part(path, payload, redigest)
    with pytest.raises(UnusablePart) as info:
        load_part(path, kept_parts[1]["value-vector"]["key"])
    assert reason in str(info.value) and info.value.path == path


def test_kept_parts_as_written_are_reused_and_unreadable_ones_refused(kept_parts, tmp_path):
    from kn_edit.evaluation.compare import UnusablePart, load_part

    parts, payloads = kept_parts
    for title, payload in payloads.items():
        result = load_part(parts / f"{title}.json", payload["key"])
        assert result is not None and result.metrics == pytest.approx(payload["metrics"], nan_ok=True)
        assert load_part(parts / f"{title}.json", "other settings") is None  # stale: run again, no warning
    assert load_part(tmp_path / "absent.json", "key") is None
    (tmp_path / "torn.json").write_text('{"key": "k", "metr')
    with pytest.raises(UnusablePart, match="unreadable"):
        load_part(tmp_path / "torn.json", "k")


def test_an_altered_part_is_evaluated_again_with_a_warning(tiny_factory, tmp_path, monkeypatch, caplog):
    """resume=true with an altered kept part: the method runs again, the user is told why (a warning in the log
    and on the reporter's line), and the comparison reports the measured numbers, not the altered ones."""
    import logging
    from contextlib import contextmanager

    import kn_edit.evaluation.compare as compare_module
    from kn_edit.progress import NullReporter

    km = tiny_factory("llama")
    config = tiny_compare_config(tmp_path)
    config.plots = False
    first = compare_methods(config, km=km, facts=tiny_facts(), passages=PASSAGES)
    path = compare_module.parts_dir(config) / "value-vector.json"
    payload = json.loads(path.read_text())
    payload["metrics"]["edit/top1"] = 0.123456
    _write_part(path, payload)

    lines: list[str] = []

    class Recording(NullReporter):
        @contextmanager
        def task(self, description, total=None):
            lines.append(description)
            with super().task(description, total) as task:
                yield task

    real, calls = compare_module.evaluate, []
    monkeypatch.setattr(compare_module, "evaluate", lambda c, **kw: calls.append(c.editor.method) or real(c, **kw))
    config.resume, config.run_name = True, "resumed"
    with caplog.at_level(logging.WARNING, logger="kn_edit.evaluation.compare"):
        resumed = compare_methods(config, km=km, facts=tiny_facts(), passages=PASSAGES, reporter=Recording())
    assert calls == ["helpers:ValueVectorEditor"]
    warning = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warning) == 1 and "value-vector" in warning[0] and "its edit/top1 is 0.123456" in warning[0]
    assert any("value-vector" in line and "not reusing" in line and "its edit/top1 is 0.123456" in line for line in lines)
    top1 = json.loads((resumed.run_dir / "metrics.json").read_text())["methods"]["value-vector"]["edit/top1"]
    assert top1 == pytest.approx(first.results["value-vector"].metrics["edit/top1"]) and top1 != 0.123456
    assert compare_module.load_part(path, payload["key"]) is not None  # written again, whole


def test_a_kept_sequential_part_is_checked_against_its_rows():
    from kn_edit.evaluation.compare import part_problem
    from kn_edit.evaluation.runner import EvalResult
    from kn_edit.evaluation.sequential import Checkpoint

    def result(rows=2, refused_at_2=1.0, final_held=0.5) -> EvalResult:
        curve = [Checkpoint(0, {"edits/refused": 0.0}), Checkpoint(1, {"edits/refused": 0.0, "edits/held": 1.0}),
                 Checkpoint(2, {"edits/refused": refused_at_2, "edits/held": 0.5})]  # fmt: skip
        made = [{"order": 1, "fact_id": "a"}, {"order": 2, "fact_id": "b", "error": "EditError: refused"}][:rows]
        metrics = {"edits/refused": refused_at_2, "edits/held": final_held, "edits/n": 2.0}
        return EvalResult(metrics, made, {}, {}, {}, curve=curve)

    assert part_problem(result()) is None
    assert "1 rows for 2 edits" in part_problem(result(rows=1))
    assert "checkpoint 2 counts 0.0 refused edits, its rows 1.0" in part_problem(result(refused_at_2=0.0))
    assert "its edits/held is 0.9" in part_problem(result(final_held=0.9))
