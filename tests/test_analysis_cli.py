"""`kn-edit analyze ...` and `kn-edit trace` through kn_edit.cli.main, a tiny model standing in for load()."""

from __future__ import annotations

import json

import pytest

import kn_edit
from kn_edit.cli import main
from tiny_models import CORPUS

FACTS = [
    {"subject": "France", "relation": "capital", "object": "Paris", "prompts": ["The capital of [X] is", "[X]'s capital is"]},
    {"subject": "Italy", "relation": "capital", "object": "Rome", "prompts": ["The capital of [X] is"]},
    {"subject": "Japan", "relation": "language", "object": "Japanese", "prompts": ["The language of [X] is"]},
]


@pytest.fixture
def tiny_load(monkeypatch, tiny_factory):
    km = tiny_factory("llama", n_layers=2)
    monkeypatch.setattr(kn_edit, "load", lambda name, device="auto", reporter=None, adapter=None: km)
    return km


@pytest.fixture
def facts_file(tmp_path):
    path = tmp_path / "facts.jsonl"
    path.write_text("".join(json.dumps(f) + "\n" for f in FACTS), encoding="utf-8")
    return path


def data_args(facts_file, tmp_path):
    return ["--data", "jsonl", "--data-dir", str(facts_file), "--all-facts", "--quiet", "steps=2", "share=0.5",
            f"cache_dir={tmp_path / 'cache'}", "accelerator=cpu", "devices=1"]


def test_distribution_reads_the_cache_on_a_rerun(tiny_load, facts_file, tmp_path, capsys):
    assert main(["analyze", "distribution", *data_args(facts_file, tmp_path), "--out", str(tmp_path / "d1")]) == 0
    first = json.loads((tmp_path / "d1" / "run.json").read_text())
    assert first["prompts_attributed"] == 4 and first["n_facts"] == 3
    assert main(["analyze", "distribution", *data_args(facts_file, tmp_path), "--out", str(tmp_path / "d2")]) == 0
    second = json.loads((tmp_path / "d2" / "run.json").read_text())
    assert second["prompts_attributed"] == 0  # nothing recomputed
    d1 = json.loads((tmp_path / "d1" / "distribution.json").read_text())
    d2 = json.loads((tmp_path / "d2" / "distribution.json").read_text())
    assert d1["layer_counts"] == d2["layer_counts"] and d1["per_relation"] == d2["per_relation"]
    assert (tmp_path / "d2" / "distribution.png").read_bytes()[:4] == b"\x89PNG"
    assert "same relation" in (tmp_path / "d2" / "distribution.md").read_text()


def test_activations_and_where_on_a_located_folder(tiny_load, facts_file, tmp_path, capsys):
    assert main(["analyze", "distribution", *data_args(facts_file, tmp_path), "--out", str(tmp_path / "d")]) == 0
    located = str(tmp_path / "d" / "located")
    assert main(["analyze", "activations", "--located", located, "--sentences", "0", "--resamples", "50", "--quiet",
                 "--out", str(tmp_path / "a")]) == 0
    acts = json.loads((tmp_path / "a" / "activations.json").read_text())
    assert set(acts["overall"]["groups"]) == {"own", "same_relation", "other_relation", "wiki"}
    assert (tmp_path / "a" / "activations.png").is_file()
    assert main(["analyze", "where", "--located", located, "--samples", "2", "--quiet", "--out", str(tmp_path / "w")]) == 0
    data = json.loads((tmp_path / "w" / "where.json").read_text())
    assert len(data["facts"]) + len(data["skipped"]) == 3 and (tmp_path / "w" / "where.png").is_file()


def test_top_text_and_trace(tiny_load, tmp_path, capsys):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(CORPUS), encoding="utf-8")
    assert main(["analyze", "top-text", "--neurons", "1:3,0:5", "--corpus", str(corpus), "-k", "2", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert [p["neuron"] for p in data["per_neuron"]] == ["0:5", "1:3"] and len(data["per_neuron"][0]["top"]) == 2
    assert data["last_layer"] == 1 and data["n_texts"] == len(CORPUS)
    assert main(["analyze", "top-text", "--neurons", "1:3", "--corpus", str(corpus), "-k", "2", "--out",
                 str(tmp_path / "t")]) == 0
    out = capsys.readouterr().out
    assert "top 1" in out and "tokens/s" in out
    assert "**" in (tmp_path / "t" / "top_text.md").read_text()
    plot = tmp_path / "trace.png"
    assert main(["trace", "-p", "The capital of France is", "-s", "France", "-t", "Paris", "--samples", "2",
                 "--plot", str(plot)]) == 0
    assert "peak effect" in capsys.readouterr().out and plot.read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("argv, message", [
    (["analyze", "top-text", "--neurons", "7:0", "--corpus", "{corpus}"], "does not exist"),
    (["analyze", "top-text", "--neurons", "0:64", "--corpus", "{corpus}"], "does not exist"),
    (["analyze", "top-text", "--neurons", "0:1", "--corpus", "{empty}"], "no text"),
    (["analyze", "top-text", "--neurons", "0:1", "--corpus", "{latin1}"], "not UTF-8"),
    (["analyze", "top-text", "--neurons", "0:1", "--corpus", "{missing}"], "not found"),
    (["analyze", "top-text", "--neurons", "0:1", "--corpus", "{corpus}", "-k", "0"], "-k must be at least 1"),
    (["analyze", "top-text", "--neurons", "zero", "--corpus", "{corpus}"], "bad neuron"),
    (["trace", "-p", "The capital of France is", "-s", "Spain", "-t", "Paris"], "not in the prompt"),
    (["analyze", "distribution", "--quiet"], "--located DIR"),
    (["analyze", "activations", "--located", "{missing}"], "not a locate-dataset output"),
])
def test_bad_input_is_one_line_error(tiny_load, tmp_path, capsys, argv, message):
    files = {"corpus": tmp_path / "c.txt", "empty": tmp_path / "e.txt", "latin1": tmp_path / "l.txt",
             "missing": tmp_path / "nope"}
    files["corpus"].write_text("Paris is the capital of France.\n", encoding="utf-8")
    files["empty"].write_text("\n\n  \n", encoding="utf-8")
    files["latin1"].write_bytes("Caf\xe9 in Paris.\n".encode("latin-1"))
    argv = [a.format(**{k: str(v) for k, v in files.items()}) for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and message in " ".join(err.split()), err
    assert "Traceback" not in err


def test_top_text_locates_the_neurons_of_a_prompt(tiny_load, tmp_path, capsys):
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": t}) + "\n" for t in CORPUS), encoding="utf-8")
    argv = ["analyze", "top-text", "-p", "The capital of France is", "-p", "France's capital is", "--target", "Paris",
            "--corpus", str(corpus), "-k", "3", "--json", "steps=2", "share=0.5"]
    assert main(argv) == 0
    data = json.loads(capsys.readouterr().out)
    expected = kn_edit.locate(tiny_load, ["The capital of France is", "France's capital is"], "Paris", steps=2, share=0.5)
    assert data["neurons"] == [str(n) for n in sorted(expected)] and data["n_texts"] == len(CORPUS)
