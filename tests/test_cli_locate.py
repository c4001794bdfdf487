"""`kn-edit locate`, `probe` and `locate-dataset` through kn_edit.cli.main, on a tiny model standing in for load()."""

from __future__ import annotations

import json

import pytest

import kn_edit
from kn_edit.cli import main

PROMPTS = ["--prompt", "The capital of France is", "--prompt", "Paris is the capital of", "--prompt",
           "The Eiffel Tower is in"]


def run_json(capsys, argv):
    assert main(argv) == 0
    return json.loads(capsys.readouterr().out)


def test_locate_table_json_and_plot(tiny_load, capsys, tmp_path):
    assert main(["locate", *PROMPTS, "--target", "Paris", "steps=3", "share=0.6"]) == 0
    out = capsys.readouterr().out
    assert "knowledge neurons" in out and "kept by prompts" in out and "P('Paris')" in out

    plot = tmp_path / "kn.png"
    data = run_json(capsys, ["locate", *PROMPTS, "--target", "Paris", "--json", "--plot", str(plot), "steps=3", "share=0.6"])
    assert data["share"] == 0.6 and len(data["probabilities"]) == 3
    assert data["neurons"] and {"layer", "index", "mean_score", "kept_by"} <= set(data["neurons"][0])
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    expected = kn_edit.locate(tiny_load, PROMPTS[1::2], "Paris", share=0.6, steps=3)
    assert [(n["layer"], n["index"]) for n in data["neurons"]] == [(n.layer, n.index) for n in expected]


def test_locate_config_file_and_adaptive(tiny_load, capsys, tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("steps: 2\nthreshold: 0.5\nadaptive: true\n")
    data = run_json(capsys, ["locate", *PROMPTS, "--target", "Paris", "--json", "--config", str(config)])
    assert data["threshold"] == 0.5 and data["steps"] == 2
    assert data["share"] != 0.5  # the adaptive rule starts at 0.7


def test_probe(tiny_load, capsys):
    data = run_json(capsys, ["probe", *PROMPTS, "--target", "Paris", "--neurons", "0:3,1:7", "--controls", "2", "--json"])
    assert data["neurons"] == ["0:3", "1:7"] and len(data["controls"]) == 2
    assert all(c[0].startswith("0:") and c[1].startswith("1:") for c in data["controls"])
    assert {"baseline", "suppressed", "ratio_suppressed"} <= set(data["mean"])
    assert main(["probe", *PROMPTS, "--target", "Paris", "steps=2"]) == 0  # locates first
    out = capsys.readouterr().out
    assert "control" in out and "mean" in out and "neurons: " in out


def test_locate_dataset_jsonl(tiny_load, capsys, tmp_path):
    facts = tmp_path / "facts.jsonl"
    facts.write_text(
        json.dumps({"id": "a", "subject": "France", "relation": "capital", "object": "Paris",
                    "prompts": ["The capital of [X] is", "[X]'s capital is", "In [X] the capital is"]}) + "\n"
        + json.dumps({"id": "b", "subject": "Italy", "relation": "capital", "object": "Rome",
                      "prompts": ["The capital of [X] is", "[X]'s capital is", "In [X] the capital is"]}) + "\n"
        + json.dumps({"id": "c", "subject": "Japan", "relation": "city", "object": "Tokyo", "prompts": ["[X] has"]}) + "\n"
    )
    argv = ["locate-dataset", "--data", "jsonl", "--data-dir", str(facts), "--quiet", "--relations", "capital",
            "steps=2", "adaptive=true", "accelerator=cpu", "devices=1", f"cache_dir={tmp_path / 'cache'}"]
    assert main([*argv, "--out", str(tmp_path / "o1")]) == 0
    assert "computed 6 prompts" in capsys.readouterr().out
    lines = (tmp_path / "o1" / "facts.jsonl").read_text().splitlines()
    assert [json.loads(l)["fact_id"] for l in lines] == ["a", "b"]
    assert main([*argv, "--out", str(tmp_path / "o2"), "--limit", "1"]) == 0
    assert "computed 0 prompts" in capsys.readouterr().out


@pytest.mark.parametrize(
    "argv,message",
    [
        (["locate", "--prompt", "The capital of France is", "--target", "Paris", "threshold=0"], "threshold"),
        (["locate", "--prompt", "The capital of France is", "--target", "Paris", "stepz=3"], "stepz"),
        (["locate", "--prompt", "The capital of France is", "--prompt", "Rome is", "--target", "Paris",
          "--subject", "France"], "different facts mixed"),
        (["probe", "--prompt", "The capital of France is", "--target", "Paris", "--neurons", "0-3"], "LAYER:INDEX"),
        (["probe", "--prompt", "The capital of France is", "--target", "Paris", "--neurons", "9:3"], "does not exist"),
        (["locate-dataset", "--data", "jsonl", "--out", "x"], "--data-dir"),
    ],
)
def test_bad_input_is_one_line(tiny_load, capsys, argv, message):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


@pytest.mark.integration
def test_probe_smollm2(smollm2, monkeypatch, capsys):
    monkeypatch.setattr(kn_edit, "load", lambda *a, **k: smollm2)
    data = run_json(capsys, ["probe", "--prompt", "The capital of France is", "--target", "Paris", "--neurons",
                             "24:1005,27:1392,29:1066", "--json"])
    assert 0.5 < data["mean"]["baseline"] < 0.95  # smollm2 gives ' Paris' p ≈ 0.77
