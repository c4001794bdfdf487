"""`evaluate` and `compare` on the field's benchmarks (hand-built cases, tiny model): the papers' metrics in
metrics.json and report.md, each the mean of the per-case rows, beside kn-edit's own metrics."""

from __future__ import annotations

import json

import pytest
import torch

from helpers import PASSAGES, ValueVectorEditor, assert_same, benchmark_cases, snapshot, tiny_config, tiny_sized
from kn_edit.errors import ConfigError
from kn_edit.evaluation import evaluate
from kn_edit.evaluation.benchmark_metrics import TABLES
from kn_edit.evaluation.compare import compare_methods
from kn_edit.evaluation.config import CompareConfig, MethodEntry


def bench_config(tmp_path, source: str, **overrides):
    return tiny_config(tmp_path, **{"data.source": source, "data.path": "given.json", "probe.enabled": False,
                                    **overrides})  # fmt: skip


def row_means(rows: list[dict]) -> dict[str, float]:
    """Every benchmark metric as the plain mean of the rows that give it."""
    values: dict[str, list[float]] = {}
    for row in rows:
        for key, value in row["benchmark"]["scores"].items():
            values.setdefault(f"{row['benchmark']['source']}/{key}", []).append(value)
    return {k: sum(v) / len(v) for k, v in values.items()}


@pytest.mark.parametrize("source", ["counterfact", "zsre", "knowedit", "mquake"])
def test_evaluate_reports_the_papers_metrics_as_means_of_the_case_rows(tiny_factory, tmp_path, source):
    km = tiny_factory("llama")
    weights = snapshot(km)
    cases = benchmark_cases()[source]
    config = bench_config(tmp_path, source, **{"benchmark.generation": True})
    result = evaluate(config, km=km, editor=ValueVectorEditor(), cases=cases, passages=PASSAGES)
    assert_same(km, weights)
    rows = [json.loads(line) for line in (result.run_dir / "facts.jsonl").read_text().splitlines()]
    assert [r["benchmark"]["case_id"] for r in rows] == [c.case_id for c in cases]
    metrics = json.loads((result.run_dir / "metrics.json").read_text())["metrics"]
    means = row_means(rows)
    for key, value in means.items():
        assert metrics[key] == pytest.approx(value, abs=1e-9), key
    for key, _ in TABLES[source]:
        if key not in ("S", "RS", "GE"):
            assert f"{source}/{key}" in metrics, key
    assert f"{source}/gen/rewrite" in metrics  # generation-based accuracy, switched on
    # kn-edit's own metrics where they map: the rewrite prompt is the edit prompt
    assert metrics["edit/n_facts"] == len(cases) and "edit/top1" in metrics
    report = (result.run_dir / "report.md").read_text()
    assert "## The benchmark's table" in report and f"`{source}/{TABLES[source][0][0]}`" in report
    if source == "counterfact":
        es_ps_ns = [means[f"counterfact/{k}"] for k in ("ES", "PS", "NS")]
        expected_s = 0.0 if min(es_ps_ns) == 0 else 3 / sum(1 / v for v in es_ps_ns)
        assert metrics["counterfact/S"] == pytest.approx(expected_s)
        # GE and RS from the cases' generation prompts; RS only where a case has reference texts
        assert "GE" in rows[1]["benchmark"]["scores"] and "RS" not in rows[1]["benchmark"]["scores"]
        assert "RS" in rows[0]["benchmark"]["scores"] and "counterfact/RS" in metrics
        assert metrics["counterfact/GE"] == pytest.approx(metrics["fluency/entropy_after"])
        # the neighborhood prompts are kn-edit's same-relation facts
        assert [r["intra"]["n"] for r in rows] == [1, 2, 1] and "intra/acc_after" in metrics
    if source == "mquake":  # both requests of a case in one edit
        assert len(rows[0]["editor"]["report"]["details"]["neurons"]) == 2  # the test editor: a neuron per request


def test_without_generation_prompts_and_references_ge_and_rs_are_missing_not_zero(tiny_factory, tmp_path):
    km = tiny_factory("gpt2")
    cases = [c.__class__(c.case_id, c.source, c.requests, c.probes) for c in benchmark_cases()["counterfact"]]
    result = evaluate(bench_config(tmp_path, "counterfact"), km=km, editor=ValueVectorEditor(), cases=cases,
                      passages=PASSAGES)  # fmt: skip
    assert "counterfact/RS" not in result.metrics and "counterfact/GE" not in result.metrics
    assert "counterfact/gen/rewrite" not in result.metrics  # generation-based accuracy is off by default
    report = (result.run_dir / "report.md").read_text()
    assert "RS (`counterfact/RS`)" in report
    table = report.split("## The benchmark's table")[1].split("\n")[4]
    assert table.endswith("n/a | n/a |")  # GE and RS: missing


def test_a_benchmark_source_needs_its_file(tmp_path):
    config = tiny_config(tmp_path, **{"data.source": "zsre"})
    with pytest.raises(ConfigError, match="data.source=zsre needs data.path"):
        config.check()
    config = tiny_config(tmp_path, **{"data.source": "zsre", "data.path": "x.json"})
    config.mode = "sequential"
    with pytest.raises(ConfigError, match="not sequential"):
        config.check()


def test_batch_mode_edits_every_case_at_once(tiny_factory, tmp_path):
    km = tiny_factory("llama")
    weights = snapshot(km)
    config = bench_config(tmp_path, "mquake")
    config.mode = "batch"
    result = evaluate(config, km=km, editor=ValueVectorEditor(), cases=benchmark_cases()["mquake"], passages=PASSAGES)
    assert_same(km, weights)
    assert result.metrics["mquake/multihop_after"] == pytest.approx(row_means(result.rows)["mquake/multihop_after"])


def test_compare_puts_the_papers_columns_beside_kn_edits(tiny_factory, tmp_path):
    km = tiny_factory("llama")
    methods = [MethodEntry("helpers:ValueVectorEditor", label="vv-10", settings={"scale": 10.0}),
               MethodEntry("helpers:ValueVectorEditor", label="vv-40", settings={"scale": 40.0})]
    config = tiny_sized(CompareConfig(name="bench", output_dir=str(tmp_path), run_name="cmp", methods=methods))
    config.data.source, config.data.path, config.probe.enabled = "counterfact", "given.json", False
    result = compare_methods(config, km=km, passages=PASSAGES, cases=benchmark_cases()["counterfact"])
    payload = json.loads((result.run_dir / "metrics.json").read_text())
    for title in ("vv-10", "vv-40"):
        metrics = payload["methods"][title]
        for key in ("ES", "PS", "NS", "S", "EM", "PM", "NM", "GE", "RS"):
            assert f"counterfact/{key}" in metrics, (title, key)
        assert metrics["counterfact/ES"] == pytest.approx(row_means(result.results[title].rows)["counterfact/ES"])
    assert payload["methods"]["vv-10"]["counterfact/EM"] != payload["methods"]["vv-40"]["counterfact/EM"]
    header = next(line for line in (result.run_dir / "report.md").read_text().splitlines() if line.startswith("| method |"))
    assert header.startswith("| method | S | ES | PS | NS | EM | PM | NM | GE | RS |") and "edit top-1" in header


def test_only_known_keeps_the_cases_whose_old_object_is_the_models_top1(tiny_factory, tmp_path):
    km = tiny_factory("llama")
    head = km.model.get_output_embeddings()
    paris = km.tokenizer(" Paris", add_special_tokens=False)["input_ids"]
    assert len(paris) == 1
    bias = torch.zeros(head.weight.shape[0])
    bias[paris[0]] = 100.0  # the model now answers " Paris" everywhere: it "knows" case 0 (France → Paris) only
    handle = head.register_forward_hook(lambda module, args, out: out + bias)
    try:
        config = bench_config(tmp_path, "counterfact", **{"data.only_known": True, "data.known_cache": False})
        result = evaluate(config, km=km, editor=ValueVectorEditor(), cases=benchmark_cases()["counterfact"],
                          passages=PASSAGES)  # fmt: skip
    finally:
        handle.remove()
    assert [r["benchmark"]["case_id"] for r in result.rows] == ["0"]
    assert result.summary["skipped"] == {"model does not predict it (top-1)": 2}


@pytest.mark.parametrize("kind", ["counterfact", "mquake"])
def test_a_benchmark_file_built_from_pararel_runs_through_its_reader_into_evaluate(tiny_factory, tmp_path, kind):
    """The whole path a user takes: make-counterfact / make-multihop write a file, evaluate reads it by
    data.source and data.path, and every case of the file becomes a row with the paper's scores."""
    from helpers import write_pararel
    from kn_edit.cli import main
    from kn_edit.data.benchmarks import load_benchmark

    people = [("Alice", "France"), ("Dan", "France"), ("Bob", "Italy"), ("Frank", "Italy"), ("Carol", "Japan")]
    folder = write_pararel(tmp_path / "pr", {"P27": ["[X] is a citizen of [Y].", "[X] holds the citizenship of [Y]."],
                                             "P36": ["The capital of [X] is [Y].", "[X]'s capital is [Y]."]},
                           {"P27": people, "P36": [("France", "Paris"), ("Italy", "Rome"), ("Japan", "Tokyo")]})
    path = tmp_path / f"{kind}.json"
    command = "make-counterfact" if kind == "counterfact" else "make-multihop"
    assert main([command, "--pararel", str(folder), "--out", str(path), "--facts", "3"]) == 0
    cases = load_benchmark(kind, path)
    assert cases
    result = evaluate(bench_config(tmp_path, kind, **{"data.path": str(path)}), km=tiny_factory("llama"),
                      editor=ValueVectorEditor(), passages=PASSAGES)  # fmt: skip
    rows = [json.loads(line) for line in (result.run_dir / "facts.jsonl").read_text().splitlines()]
    assert [r["benchmark"]["case_id"] for r in rows] == [c.case_id for c in cases]
    first = TABLES[kind][0][0]
    assert f"{kind}/{first}" in result.metrics


@pytest.mark.parametrize("batch_facts, fluency", [(1, True), (2, False), (64, True)])
def test_benchmark_continuations_equal_each_edit_applied_alone(tiny_factory, tmp_path, monkeypatch, batch_facts,
                                                              fluency):
    """The greedy continuations the evaluation hands to generation-based accuracy, before and after each case's
    edit (while other facts' fluency generations wait for their batch, or with fluency off), equal a plain loop
    per case (measure, generate; apply the edit, generate, revert). Three sources, cases with two requests in one
    edit (MQuAKE), one case the editor refuses (after = before)."""
    import kn_edit.evaluation.module as module
    from kn_edit.evaluation.benchmark import generate, measure
    from kn_edit.evaluation.benchmark_metrics import groups_of

    km = tiny_factory("llama")
    km.model.double()
    cases = [c for source in ("counterfact", "mquake", "zsre") for c in benchmark_cases()[source]]
    seen = []
    real = module.case_scores

    def spy(*args, **kwargs):
        seen.append((args[-2], args[-1]))  # the continuations before and after the edit
        return real(*args, **kwargs)

    monkeypatch.setattr(module, "case_scores", spy)
    editor = ValueVectorEditor(scale=5.0, fail_on=["Japan"])
    config = bench_config(tmp_path, "counterfact", **{"benchmark.generation": True})
    config.fluency.batch_facts, config.fluency.enabled = batch_facts, fluency
    evaluate(config, km=km, editor=editor, cases=cases, passages=PASSAGES, write=False)
    assert len(seen) == len(cases)
    extra = config.benchmark.generation_extra_tokens
    moved = refused = 0
    for case, (got_before, got_after) in zip(cases, seen):
        groups = groups_of(case)
        before = generate(km, groups, measure(km, groups), extra)
        try:
            edit = editor.apply(km, list(case.requests))
        except Exception:  # refused: after = before
            after, refused = before, refused + 1
        else:
            try:
                after = generate(km, groups, measure(km, groups), extra)
            finally:
                edit.revert()
        assert got_before == before, case.case_id
        assert got_after == after, case.case_id
        moved += after != before
    assert moved and refused  # edits moved some continuations; a refused case kept its own
