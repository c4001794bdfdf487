"""`kn-edit analyze ...` and `kn-edit trace` through kn_edit.cli.main, a tiny model standing in for load()."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

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


# In a subprocess: top-text on a tiny model over the corpus file argv[1] (extra arguments follow); prints the scan's
# JSON, then "STATS" and the command's exit code, seconds and peak-RSS growth (bytes).
_BIG_SCAN = """
import json, resource, sys, time
import kn_edit
from kn_edit.cli import main
from tiny_models import build_model

def status(field):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field))

model, tok = build_model("llama")
km = kn_edit.wrap(model, tok, name="tiny")
kn_edit.load = lambda *a, **k: km
base = status("VmHWM:")
# Holding the whole line would now fail (a MemoryError, or an abort in the tokenizer) instead of taking the machine.
resource.setrlimit(resource.RLIMIT_DATA, (status("VmData:") + (1 << 30), resource.RLIM_INFINITY))
start = time.perf_counter()
code = main(["analyze", "top-text", "--neurons", "1:3", "--corpus", sys.argv[1], "-k", "1", "--json", *sys.argv[2:]])
print("STATS", json.dumps({"code": code, "seconds": time.perf_counter() - start, "growth": status("VmHWM:") - base}))
"""


@pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="reads peak memory from /proc")
@pytest.mark.parametrize("unit", ["sentence", "passage"])
def test_top_text_scans_a_50_mb_line_in_bounded_memory_and_time(tmp_path, unit):
    """A one-line 50 MB corpus (it took 6 GB and minutes, tokenized whole) is read a chunk at a time and each text
    cut by characters before tokenizing: the scan's peak memory grows by megabytes, and the answer is its head."""
    corpus = tmp_path / "one-line.txt"
    corpus.write_text("paris is the capital of france and rome is in italy " * 1_000_000, encoding="utf-8")
    tests = Path(__file__).resolve().parent
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tests.parent), str(tests)]), "OMP_NUM_THREADS": "1"}
    extra = ["--passages"] if unit == "passage" else []
    run = subprocess.run([sys.executable, "-c", _BIG_SCAN, str(corpus), *extra], capture_output=True, text=True,
                         env=env, timeout=600)  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    out, _, stats = run.stdout.rpartition("STATS ")
    stats, scan = json.loads(stats), json.loads(out)
    assert stats["code"] == 0 and scan["n_texts"] == 1 and scan["n_tokens"] == 128  # the first --max-tokens
    assert stats["growth"] < 256 * 2**20, stats
    assert stats["seconds"] < 60, stats
    hit = scan["per_neuron"][0]["top"][0]
    assert hit["text"].startswith("paris is the capital") and len(hit["text"]) < 100_000
