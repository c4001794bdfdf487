"""`kn-edit evaluate` end to end on a tiny saved model: run directory, summary, baseline regression gate,
and clear one-line errors for bad configs."""

from __future__ import annotations

import json

import pytest

from helpers import PASSAGES, SUBJECTS, write_capital_facts
from kn_edit.cli import main
from kn_edit.evaluation.regression import compare, direction
from kn_edit.errors import ConfigError
from tiny_models import build_model


@pytest.fixture
def setup(tmp_path):
    model, tokenizer = build_model("gpt2")
    model.save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    facts = write_capital_facts(tmp_path / "facts.jsonl")
    text = tmp_path / "text.txt"
    text.write_text("\n\n".join(PASSAGES))
    config = tmp_path / "eval.yaml"
    config.write_text(f"""
name: cli
model: {tmp_path / "model"}
data: {{source: jsonl, path: {facts}, only_known: false, neighbours: 2}}
text: {{source: file, path: {text}, passages: 2}}
editor: {{method: "helpers:ValueVectorEditor", settings: {{scale: 10.0}}}}
probe: {{steps: 2}}
trainer: {{accelerator: cpu}}
output_dir: {tmp_path / "runs"}
""")
    return tmp_path, config


def test_evaluate_command_writes_a_run_and_gates_on_a_baseline(setup, capsys):
    tmp_path, config = setup
    assert main(["evaluate", "--quiet", "--config", str(config), "run_name=first"]) == 0
    out = capsys.readouterr().out
    assert "edit/top1" in out and "results:" in out
    run = tmp_path / "runs" / "first"
    metrics = json.loads((run / "metrics.json").read_text())["metrics"]
    assert {"edit/top1", "drift/mean_change", "probe/suppressed"} <= metrics.keys()
    assert len((run / "facts.jsonl").read_text().splitlines()) == len(SUBJECTS)

    # Same run against its own numbers: passes. Against a baseline it cannot reach: exit 1, named metric.
    args = ["evaluate", "--quiet", "--config", str(config), f"regression.baseline={run / 'metrics.json'}",
            "regression.tolerances.edit/new_beats_old=0.0"]  # fmt: skip
    assert main(args + ["run_name=second"]) == 0
    better = dict(metrics, **{"edit/new_beats_old": metrics["edit/new_beats_old"] + 0.5})
    (tmp_path / "better.json").write_text(json.dumps({"metrics": better}))
    args[4] = f"regression.baseline={tmp_path / 'better.json'}"
    assert main(args + ["run_name=third"]) == 1
    assert "edit/new_beats_old" in capsys.readouterr().out


@pytest.mark.parametrize(
    "override, message",
    [("data.sourcee=x", "sourcee"), ("data.source=wiki", "data.source"), ("editor.method=os:path", "is not an editor"), ("editor.method=no_such:Editor", "cannot import editor"),
     ("editor.method=romeo", "unknown method"), ("editor.settings.scalee=1", "scalee"), ("editor.settings.scale=abc", "scale"),
    
     ("data.path=/nonexistent.jsonl", "no such file"), ("trainer.strategy=ddp_spawn", "not supported")],
)  # fmt: skip
def test_bad_configs_are_one_line_errors(setup, capsys, override, message):
    _, config = setup
    assert main(["evaluate", "--quiet", "--config", str(config), override]) == 2
    err = capsys.readouterr().err
    assert "error:" in err and message in err


def test_regression_directions_and_tolerances():
    base = {"edit/top1": 0.8, "drift/mean_log_ratio": 0.1, "probe/suppressed": -0.5}
    assert compare({"edit/top1": 0.7, "drift/mean_log_ratio": 0.3, "probe/suppressed": -0.5}, base,
                   {"edit/top1": 0.12, "drift/mean_log_ratio": 0.25, "probe/suppressed": 0.1}) == []  # fmt: skip
    bad = compare({"edit/top1": 0.6, "drift/mean_log_ratio": 0.5, "probe/suppressed": -0.2}, base,
                  {"edit/top1": 0.12, "drift/mean_log_ratio": 0.25, "probe/suppressed": 0.1})  # fmt: skip
    assert [r.metric for r in bad] == ["edit/top1", "drift/mean_log_ratio", "probe/suppressed"]
    assert [r.metric for r in compare({}, base, {"edit/top1": 1.0})] == ["edit/top1"]  # missing counts as regressed
    assert direction("intra/retained") == 1 and direction("drift/share_large") == -1
    assert direction("rome:generalization/top1_subject_first") == 1  # the subject-first paraphrases (issue 30)
    assert direction("counterfact/NS") == direction("knowedit/Locality") == direction("mquake/multihop_after") == 1
    with pytest.raises(ConfigError, match="no known direction"):  # the unedited model's accuracy: not gated
        direction("mquake/multihop_before")
    with pytest.raises(ConfigError, match="no known direction"):
        compare(base, {"edit/n_facts": 3}, {"edit/n_facts": 1})
