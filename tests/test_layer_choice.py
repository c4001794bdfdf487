"""The edit layer measured per model (issue 30): `kn-edit choose-layer` sweeps the candidate layers on the same
facts, keeps the best-scoring one for the model and method, and rome / kn-subject / memit then edit there when
no layer is given, saying where the layer came from."""

from __future__ import annotations

import json
import math

import pytest

from helpers import PASSAGES, tiny_facts, tiny_sized
from kn_edit import ConfigError
from kn_edit.editing import EditRequest, make_editor
from kn_edit.editing.keyvalue.layer_choice import choices_path, measured_layers, save_measured
from kn_edit.evaluation.layer_sweep import LayerSweepConfig, layer_settings, score, sweep_layers
from tiny_models import CORPUS

REQUEST = EditRequest(("The capital of France is",), "Paris", "Rome", subject="France")


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("KN_EDIT_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def _quick(tmp_path) -> list[str]:
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(CORPUS))
    return ["n_prefixes=1", "prefix_length=2", "steps=3", f"cov_corpus={corpus}", "cov_tokens=200",
            f"cache_dir={tmp_path / 'stats'}"]


def _details(km, method: str, tmp_path, extra=()):
    edit = make_editor(method, overrides=_quick(tmp_path) + list(extra)).apply(km, [REQUEST])
    details = edit.report.details
    edit.revert()
    return details


def test_without_a_measured_choice_the_rule_or_table_decides(tiny_factory, tmp_path, cache):
    km = tiny_factory("llama", n_layers=4)
    details = _details(km, "rome", tmp_path)
    assert details.layer_source == "rule" and details.layer == 1  # a sixth of 4 layers, rounded


def test_a_measured_layer_is_used_reported_and_overridden_by_the_setting(tiny_factory, tmp_path, cache):
    km = tiny_factory("llama", n_layers=4)
    path = save_measured(km, "rome", [2], [{"layer": 2, "score": 1.0}], {"chosen_layer": 2})
    assert path == choices_path(km.name) and path.parent == cache / "layers"
    details = _details(km, "rome", tmp_path)
    assert details.layer == 2 and details.layer_source == f"measured ({path})"
    assert _details(km, "kn-subject", tmp_path, ["max_text_change=null", "widen_above=null"]).layer_source == "rule"
    given = _details(km, "rome", tmp_path, ["layer=0"])
    assert given.layer == 0 and given.layer_source == "setting"
    # memit without its own measurement: the two layers below ROME's measured one
    memit = _details(km, "memit", tmp_path)
    assert memit.layers == [0, 1, 2] and memit.layer_source.startswith("rule (the two layers below ROME's measured")
    save_measured(km, "memit", [1, 2], [], {})
    assert _details(km, "memit", tmp_path).layers == [1, 2]
    assert measured_layers(km, "rome").layers == (2,)  # the other method's choice kept


def test_a_choice_made_for_another_architecture_is_not_used(tiny_factory, tmp_path, cache):
    small, big = tiny_factory("llama", n_layers=2), tiny_factory("llama", n_layers=4)
    assert small.name == big.name
    save_measured(big, "rome", [3], [], {})
    assert measured_layers(small, "rome") is None
    save_measured(small, "rome", [1], [], {})  # replaces the other architecture's record
    assert measured_layers(big, "rome") is None and measured_layers(small, "rome").layers == (1,)


def test_a_broken_choice_file_is_a_clear_error(tiny_factory, tmp_path, cache):
    km = tiny_factory("llama", n_layers=4)
    path = choices_path(km.name)
    path.parent.mkdir(parents=True)
    path.write_text("{not json")
    with pytest.raises(ConfigError, match="not a readable layer-choice file"):
        measured_layers(km, "rome")
    path.write_text(json.dumps({"format": 1, "architecture": ["llama", 4, km.d_model],
                                "methods": {"rome": {"layers": [9]}}}))
    with pytest.raises(ConfigError, match="no valid layers"):
        measured_layers(km, "rome")
    with pytest.raises(ConfigError, match="method must be one of"):
        save_measured(km, "kn", [1], [], {})


def test_score_and_memit_ranges():
    assert score({"edit/top1": 1.0, "generalization/top1": 0.5, "intra_same/retained": 1.0, "inter/retained": 0.5,
                  "drift/mean_change": 0.01}) == pytest.approx(0.74)
    assert score({"edit/top1": 1.0, "generalization/top1": math.nan, "inter/retained": 0.0}) == pytest.approx(0.5)
    config = LayerSweepConfig(method="memit", memit_span=3)
    assert layer_settings(config, 1) == {"layers": [0, 1]} and layer_settings(config, 5) == {"layers": [3, 4, 5]}
    assert layer_settings(LayerSweepConfig(), 4) == {"layer": 4}
    with pytest.raises(ConfigError, match="leave out layer"):
        LayerSweepConfig(settings={"layer": 3}).check()
    with pytest.raises(ConfigError, match="method must be one of"):
        LayerSweepConfig(method="ft").check()


def test_the_sweep_keeps_the_best_scoring_layer(tiny_factory, tmp_path, cache):
    km = tiny_factory("llama", n_layers=4)
    settings = dict(item.split("=", 1) for item in _quick(tmp_path))
    settings = {k: (int(v) if v.isdigit() else v) for k, v in settings.items()}
    config = tiny_sized(LayerSweepConfig(output_dir=str(tmp_path / "runs"), run_name="sweep", layers=[0, 1, 2],
                                         settings=settings))  # fmt: skip
    config.data.max_facts = 3
    sweep = sweep_layers(config, km=km, facts=tiny_facts(), passages=PASSAGES, write=False)
    assert [r["layer"] for r in sweep.rows] == [0, 1, 2]
    best = max(r["score"] for r in sweep.rows)
    assert sweep.chosen["score"] == best
    assert sweep.chosen is next(r for r in sweep.rows if r["score"] == best)  # ties: the lower layer
    for row in sweep.rows:  # each row's score is the plain formula over its comparison's metrics
        metrics = sweep.comparison.results[f"layer{row['layer']}"].metrics
        assert row["score"] == score(metrics)
    kept = json.loads(choices_path(km.name).read_text())
    assert kept["methods"]["rome"]["layers"] == [sweep.chosen["layer"]] and len(kept["methods"]["rome"]["sweep"]) == 3
    assert measured_layers(km, "rome").layers == (sweep.chosen["layer"],)


def test_choose_layer_command(tiny_factory, tmp_path, cache, capsys):
    from helpers import write_capital_facts
    from kn_edit.cli import main

    model, folder = tiny_factory("llama", n_layers=4), tmp_path / "model"
    model.save(folder)
    facts = write_capital_facts(tmp_path / "facts.jsonl", [("France", "Paris"), ("Italy", "Rome"), ("Japan", "Tokyo")])
    settings = ", ".join(f"{k}: {v}" for k, v in (item.split("=", 1) for item in _quick(tmp_path)))
    config = tmp_path / "layers.yaml"
    config.write_text(f"""
name: cli
model: {folder}
method: rome
layers: [1, 2]
settings: {{{settings}}}
data: {{source: jsonl, path: {facts}, only_known: false, neighbours: 1}}
text: {{source: none}}
fluency: {{enabled: false}}
probe: {{enabled: false}}
trainer: {{accelerator: cpu}}
output_dir: {tmp_path / "runs"}
""")
    assert main(["choose-layer", "--quiet", "--config", str(config), "run_name=one"]) == 0
    out = capsys.readouterr().out
    assert "chosen: layer" in out and "kept in" in out and (tmp_path / "runs" / "one" / "report.md").exists()
    table_lines = out[: out.index("chosen: layer")].splitlines()
    assert "paraphr." in out and max(len(line) for line in table_lines) <= 80  # the table fits a screen
    kept = json.loads(next((cache / "layers").glob("*.json")).read_text())
    assert kept["methods"]["rome"]["layers"][0] in (1, 2) and kept["architecture"][1] == 4
    for bad, message in ((["method=ft"], "method must be one of"), (["layers=[1,9]"], "do not exist"),
                         (["settings={layer: 2}"], "leave out layer")):  # fmt: skip
        assert main(["choose-layer", "--quiet", "--config", str(config), "run_name=bad"] + bad) == 2
        assert message in capsys.readouterr().err
