"""Where an edit's time goes: the phase timer's accounting (against a fake clock), every registered method's
report.timings on tiny models, update-fact's time line, the comparison's per-phase table, and evaluations/bench_edit.py's worker."""

from __future__ import annotations

import json
import re

import pytest

from helpers import PASSAGES, tiny_facts, tiny_sized
from kn_edit.cli import main
from kn_edit.editing import EditRequest, make_editor
from kn_edit.editing import report as report_module
from kn_edit.editing.registry import method_names
from kn_edit.editing.report import PhaseTimer, format_timings
from kn_edit.evaluation.compare import compare_methods
from kn_edit.evaluation.config import CompareConfig, MethodEntry
from kn_edit.evaluation.metrics import phase_seconds
from tiny_models import CORPUS

UPDATE = EditRequest(prompts=("The capital of France is", "Paris is the capital of France. The capital of France is"),
                     old="Paris", new="Rome", subject="France")
ERASE = EditRequest(prompts=("The capital of France is",), old="Paris")
GUARD = ["The capital of France is Paris.", "Rome is located in Italy."]
# Tiny random models: loose norm bounds and few steps (tests/test_rome.py, test_memit.py, test_subject_neurons.py).
KEY_VALUE = dict(n_prefixes=2, prefix_length=3, steps=3, lr=0.5, clamp_norm_factor=1e4, weight_decay=0.0)
LOCATE = dict(steps=2, force=True, generic_filter=False)
# per registered method: (settings, constructor extras, request, the phases its report must name)
METHODS = {
    "kn": (dict(LOCATE, max_text_change=None, on_failure="apply", solve_steps=2), {"guard_texts": GUARD}, UPDATE,
           ["prepare", "locate", "solve", "guard"]),
    "kn-paper": (LOCATE, {}, UPDATE, ["prepare", "locate", "solve"]),
    "kn-unscaled": (LOCATE, {}, UPDATE, ["prepare", "locate", "solve"]),
    "kn-erase": (LOCATE, {}, ERASE, ["prepare", "locate"]),
    "kn-erase-relation": (dict(steps=2, relation_share=0.5), {}, ERASE, ["locate"]),
    "rome": (dict(KEY_VALUE, layer=0), {"key_texts": CORPUS}, UPDATE, ["statistics", "prefixes", "keys", "optimise", "solve"]),
    "memit": (dict(KEY_VALUE, layers=[0, 1]), {"key_texts": CORPUS}, UPDATE,
              ["statistics", "prefixes", "optimise", "solve"]),
    "kn-subject": (dict(KEY_VALUE, layer=0, neurons=8, attribution_steps=2, cov_ridge=1e-3, max_text_change=None,
                        widen_above=1e-12), {"key_texts": CORPUS, "guard_texts": GUARD}, UPDATE,
                   ["statistics", "prefixes", "locate", "keys", "optimise", "solve", "widen", "guard"]),
    "ft": (dict(layer=1, steps=3, lr=1e-2), {}, UPDATE, ["prepare", "optimise"]),
    "ft-m": (dict(layer=1, steps=3, lr=1e-2), {}, UPDATE, ["prepare", "optimise"]),
}


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_the_timer_charges_each_second_to_the_innermost_phase_once(monkeypatch):
    clock = FakeClock()
    monkeypatch.setattr(report_module.time, "perf_counter", clock)
    timer = PhaseTimer()
    with timer("prepare"):
        clock.now += 1.0
        with timer("locate"):  # prepare pauses meanwhile
            clock.now += 4.0
        clock.now += 0.5
    clock.now += 2.0  # in no phase: "other"
    with timer("solve"):
        clock.now += 3.0
    with timer("prepare"):  # entered again: adds up
        clock.now += 0.25
    assert timer.seconds == {"prepare": 1.75, "locate": 4.0, "solve": 3.0}
    assert list(timer.timings(10.75)) == ["prepare", "locate", "solve", "other"]
    assert timer.timings(10.75)["other"] == pytest.approx(2.0)
    assert timer.timings(1.0)["other"] == 0.0  # never negative
    with pytest.raises(RuntimeError), timer("guard"):  # a phase that raises is charged too
        clock.now += 1.0
        raise RuntimeError
    assert timer.seconds["guard"] == 1.0


def test_format_timings_is_one_short_line():
    assert format_timings(8.1, {"locate": 4.2, "solve": 2.0, "guard": 1.1, "commit": 0.001, "other": 0.8}) == \
        "8.1 s (locate 4.2, solve 2.0, guard 1.1, other 0.8)"
    assert format_timings(0.21, {"solve": 0.2, "other": 0.013}) == "0.21 s (solve 0.2, other 0.013)"


def test_every_registered_method_is_covered():
    assert sorted(METHODS) == sorted(method_names())


@pytest.mark.parametrize("family", ["gpt2", "llama"])
@pytest.mark.parametrize("method", list(METHODS))
def test_every_method_reports_where_its_time_went(tiny_factory, tmp_path, family, method):
    km = tiny_factory(family)
    settings, extras, request, phases = METHODS[method]
    if method in ("rome", "memit", "kn-subject"):
        settings = dict(settings, cache_dir=str(tmp_path / "cache"))
    editor = make_editor(method, overrides=settings, **extras)
    editor.apply(km, [request]).revert()  # the key statistics computed and cached: the timed edit reads them
    edit = editor.apply(km, [request])
    report = edit.report
    edit.revert()
    timings = report.timings
    assert list(timings)[-1] == "other" and set(phases) | {"commit", "report"} <= set(timings), list(timings)
    named = sum(v for k, v in timings.items() if k != "other")
    assert all(v >= 0 for v in timings.values())
    assert named <= report.seconds
    assert timings["other"] == pytest.approx(report.seconds - named, abs=1e-9)
    # the phases cover the edit: what no phase names is a small part of it (python between the phases)
    assert timings["other"] <= 0.25 * report.seconds + 0.01, timings
    plain = report.to_dict()
    assert plain["timings"] == timings and plain["seconds"] == report.seconds
    assert not hasattr(editor, "_timer") or editor._timer is None  # the timer belongs to one apply


def test_update_fact_prints_the_time_per_phase(tiny_factory, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")  # the line unwrapped
    saved = tiny_factory("llama").save(tmp_path / "tiny")
    code = main(["update-fact", "--model", str(saved), "--prompt", "The capital of France is", "--old", "Paris",
                 "--new", "Rome", "--force", "--neurons", "1:5,1:7", "--quiet", "--method", "kn-paper", "--verbose"])
    out = capsys.readouterr().out
    assert code == 0
    line = next(line for line in out.splitlines() if line.startswith("kn-paper time: "))
    assert re.fullmatch(r"kn-paper time: [\d.e-]+ s \((\w+ [\d.e-]+, )+\w+ [\d.e-]+\)", line), line
    # Phases under 1 % of the edit are left off the line, so which ones show depends on the machine's load;
    # each one shown is a phase the knowledge-neuron editor times.
    shown = set(re.findall(r"(\w+) [\d.e-]+(?=[,)])", line))
    assert shown and shown <= {"prepare", "locate", "solve", "guard", "commit", "report", "other"}, line


def test_phase_seconds_are_means_per_edit_over_the_edits_made():
    rows = [{"editor": {"report": {"seconds": 3.0, "timings": {"locate": 2.0, "other": 1.0}}}},
            {"editor": {"report": {"seconds": 5.0, "timings": {"locate": 1.0, "guard": 3.0, "other": 1.0}}}},
            {"error": "EditError: refused"},  # a refused edit has no report (nor seconds)
            {"report": {"seconds": 1.0, "timings": {"guard": 1.0, "other": 0.0}}}]  # a sequential run's row
    means = phase_seconds(rows)
    assert list(means) == ["locate", "guard", "other"]
    assert means == pytest.approx({"locate": 1.0, "guard": 4 / 3, "other": 2 / 3})
    assert sum(means.values()) == pytest.approx((3.0 + 5.0 + 1.0) / 3)  # the mean seconds per edit
    assert phase_seconds([{"editor": {"report": {"seconds": 1.0}}}]) == {}  # rows of an older kn-edit


def test_compare_reports_mean_seconds_per_phase_per_method(tiny_factory, tmp_path):
    methods = [MethodEntry("kn-unscaled", settings=dict(LOCATE)),
               MethodEntry("helpers:ValueVectorEditor", label="value-vector", settings={"scale": 10.0})]
    config = tiny_sized(CompareConfig(name="tiny", output_dir=str(tmp_path), run_name="cmp", methods=methods))
    config.plots = False
    result = compare_methods(config, km=tiny_factory("llama"), facts=tiny_facts(), passages=PASSAGES)
    payload = json.loads((result.run_dir / "metrics.json").read_text())
    for title, r in result.results.items():
        timings = payload["timings"][title]
        assert timings == pytest.approx(phase_seconds(r.rows))  # (metrics.json's keys are sorted)
        assert sum(timings.values()) == pytest.approx(r.metrics["edit/seconds"], rel=1e-4)
    assert {"prepare", "locate", "solve", "commit", "report"} <= set(payload["timings"]["kn-unscaled"])
    assert set(payload["timings"]["value-vector"]) == {"commit", "report", "other"}  # a user's editor names none
    report = (result.run_dir / "report.md").read_text()
    section = report.split("## Where the time goes: mean seconds per edit, by phase")[1].split("\n## ")[0]
    head, _, *rows = [line for line in section.splitlines() if line.startswith("|")]
    assert head.startswith("| method | total | prepare | locate | solve |") and head.endswith("| other |")
    assert [row.split(" | ")[0] for row in rows] == ["| kn-unscaled", "| value-vector"]
    assert rows[1].count("n/a") == len(head.split("|")) - 2 - 5  # value-vector: only commit, report, other


def _bench():
    from helpers import evaluation_script

    return evaluation_script("bench_edit")


def test_bench_edit_times_each_edit_in_a_fresh_process_after_a_warm_up(tiny_factory, tmp_path):
    bench = _bench()
    saved = tiny_factory("llama").save(tmp_path / "tiny")
    requests = [{"prompts": [f"The capital of {s} is"], "old": o, "new": "Rome", "subject": s, "relation": "capital"}
                for s, o in (("France", "Paris"), ("Japan", "Tokyo"))]
    run = bench.run_worker(bench.ROOT, str(saved), "kn-paper", ["force=true", "steps=2", "generic_filter=false"],
                           requests, threads=1, profile=True)
    assert run["warm_up"] > 0 and [e["fact"] for e in run["edits"]] == ["France: Paris -> Rome", "Japan: Tokyo -> Rome"]
    for edit in run["edits"]:
        assert edit["error"] is None and edit["wall"] >= edit["seconds"] > 0
        assert sum(edit["timings"].values()) == pytest.approx(edit["seconds"])
        # --profile: the profiled phases (CPU seconds) add up to the profiled edit, within its process time
        assert list(edit["profile"]) == [*bench.PROFILE_PHASES, "other"] and edit["profile"]["locate"] > 0
        assert sum(edit["profile"].values()) == pytest.approx(edit["profile_total"])
        assert edit["profile_total"] <= edit["cpu"] * 1.05 + 0.01 and edit["change"] > 0
    twice = bench.joined([run, run])
    assert twice["summary"]["n"] == 4 and twice["summary"]["wall"] == pytest.approx(bench.summary(run)["wall"])
    assert list(twice["summary"]["phases"])[:3] == ["prepare", "locate", "solve"]
    assert sum(twice["summary"]["phases"].values()) == pytest.approx(twice["summary"]["seconds"])
    # per phase: the mean over the facts of each fact's best run (here both runs are the same)
    locate = [e["profile"]["locate"] for e in run["edits"]]
    assert twice["summary"]["profile"]["locate"] == pytest.approx(sum(locate) / 2)
    assert twice["summary"]["profile"]["total (wall)"] == pytest.approx(bench.summary(run)["wall"])
    faster = {**run, "edits": [{**e, "profile": {**e["profile"], "locate": 0.0}} for e in run["edits"]]}
    assert bench.joined([run, faster])["summary"]["profile"]["locate"] == 0.0
    assert bench.change_difference(run["edits"], run["edits"]) == 0.0
    other = [{**e, "change": e["change"] * 1.01} for e in run["edits"]]
    assert bench.change_difference(run["edits"], other) == pytest.approx(0.01 / 1.01)
