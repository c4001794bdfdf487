"""`kn-edit update-fact`, `erase-fact`, `apply-patch`, `revert-patch` on a tiny saved model, and bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import kn_edit
from helpers import assert_same, differences, snapshot
from kn_edit import EditError, Neuron
from kn_edit.cli import main

METHODS_DIR = Path(__file__).resolve().parents[1] / "configs" / "methods"
CONFIG = METHODS_DIR / "kn.yaml"


@pytest.fixture
def saved_tiny(tiny_factory, tmp_path) -> Path:
    km = tiny_factory("llama")
    return km.save(tmp_path / "tiny")


def weights(path: Path) -> dict[str, torch.Tensor]:
    return snapshot(kn_edit.load(str(path), device="cpu"))


def test_update_fact_shows_the_edit_and_writes_nothing(saved_tiny, capsys):
    before = sorted(p.name for p in saved_tiny.parent.iterdir())
    code = main(["update-fact", "--model", str(saved_tiny), "--prompt", "The capital of France is", "--old", "Paris",
                 "--new", "Rome", "--force", "--neurons", "1:5,1:7", "--quiet", "--config", str(CONFIG),
                 "direction=contrast", "max_scale=16", "bisect_steps=1", "on_failure=apply", "--verbose"])
    out = capsys.readouterr().out
    assert code == 0
    assert "P(Paris)" in out and "P(Rome)" in out and "controls kept" in out and "kn: parameters changed" in out
    assert "2 of 64" in out and "neurons (2)" in out  # one layer's value weight, two of its value vectors
    assert "nothing written" in out
    assert sorted(p.name for p in saved_tiny.parent.iterdir()) == before


def test_patch_commands_round_trip(saved_tiny, tmp_path, capsys):
    patch = tmp_path / "edit.safetensors"
    assert main(["update-fact", "--model", str(saved_tiny), "-p", "The capital of France is", "--old", "Paris",
                 "--new", "Rome", "--force", "--neurons", "0:3,1:5", "--method", "kn-paper", "--quiet",
                 "--save-patch", str(patch)]) == 0
    assert patch.is_file()
    assert main(["apply-patch", "--model", str(saved_tiny), "--patch", str(patch), "--save", str(tmp_path / "patched")]) == 0
    assert main(["revert-patch", "--model", str(tmp_path / "patched"), "--patch", str(patch),
                 "--save", str(tmp_path / "unpatched")]) == 0
    capsys.readouterr()
    original, patched, unpatched = weights(saved_tiny), weights(tmp_path / "patched"), weights(tmp_path / "unpatched")
    assert differences(original, patched) == [f"model.layers.{l}.mlp.down_proj.weight" for l in (0, 1)]
    assert differences(original, unpatched) == []
    # the patched model does not hold the patch's original values any more
    assert main(["apply-patch", "--model", str(tmp_path / "patched"), "--patch", str(patch)]) == 2
    assert "original values" in capsys.readouterr().err


def test_erase_fact_saves_the_model(saved_tiny, tmp_path, capsys):
    out = tmp_path / "erased"
    assert main(["erase-fact", "--model", str(saved_tiny), "-p", "The capital of France is", "--target", "Paris",
                 "--force", "--neurons", "1:5", "--quiet", "--save", str(out)]) == 0
    assert "edited model written" in capsys.readouterr().out
    erased = kn_edit.load(str(out), device="cpu")
    assert torch.equal(erased.value_vectors(1)[5], torch.zeros(erased.d_model))


def test_cli_errors_are_one_line(saved_tiny, tmp_path, capsys):
    args = ["update-fact", "--model", str(saved_tiny), "-p", "The capital of France is", "--quiet"]
    assert main(args + ["--old", "Paris", "--new", "Paris"]) == 2
    assert "same" in capsys.readouterr().err
    assert main(args + ["--old", "Paris", "--new", "Rome", "--neurons", "1:5"]) == 2  # not predicted, no --force
    assert "--force" in capsys.readouterr().err
    assert main(args + ["--old", "Paris", "--new", "Rome", "nope=1"]) == 2
    assert "nope" in capsys.readouterr().err
    assert main(args + ["--old", "Paris", "--new", "Rome", "rule=magic"]) == 2
    assert "rule" in capsys.readouterr().err
    assert main(args + ["--old", "Paris", "--new", "Rome", "--method", "romeo"]) == 2
    assert "unknown method" in capsys.readouterr().err
    assert main(args + ["--old", "Paris", "--new", "Rome", "--method", "os:path"]) == 2
    assert "not an editor" in capsys.readouterr().err
    assert main(["erase-fact", "--model", str(saved_tiny), "-p", "The capital of France is", "--target", "Paris",
                 "--method", "kn", "--quiet"]) == 2
    assert "cannot erase" in capsys.readouterr().err
    assert main(args + ["--old", "Paris", "--new", "Rome", "--force", "--neurons", "1:5",
                        "--save", str(saved_tiny)]) == 2
    assert "loaded from" in capsys.readouterr().err


def test_library_bad_input(tiny_factory, tmp_path):
    km = tiny_factory("gpt2")
    state = snapshot(km)
    with pytest.raises(EditError, match="same"):
        kn_edit.update_fact(km, ["The capital of France is"], "Paris", " Paris", neurons=[Neuron(0, 1)])
    with pytest.raises(EditError, match="does not predict 'Paris'"):
        kn_edit.update_fact(km, ["The capital of France is"], "Paris", "Rome", neurons=[Neuron(0, 1)])
    with pytest.raises(EditError, match="does not predict"):
        kn_edit.erase_fact(km, ["The capital of France is"], "Paris", neurons=[Neuron(0, 1)])
    with pytest.raises(kn_edit.KnEditError, match="does not exist"):
        kn_edit.update_fact(km, ["The capital of France is"], "Paris", "Rome", neurons=[Neuron(9, 1)], force=True)
    with pytest.raises(kn_edit.ConfigError, match="rule"):
        kn_edit.update_fact(km, ["The capital of France is"], "Paris", "Rome", rule="magic", neurons=[Neuron(0, 1)])
    with pytest.raises(kn_edit.ConfigError, match="unknown setting"):
        kn_edit.update_fact(km, ["The capital of France is"], "Paris", "Rome", neurons=[Neuron(0, 1)], marginn=1)
    with pytest.raises(EditError, match="prefix"):
        kn_edit.update_fact(km, ["The capital of France is"], "Paris", "Paris, France", neurons=[Neuron(0, 1)], force=True)
    assert_same(km, state)


@pytest.mark.parametrize("name", list(kn_edit.editing.METHODS))
def test_method_yaml_states_the_defaults(name):
    """configs/methods/NAME.yaml documents the method's defaults: loading it changes nothing, and it names every
    setting of the method's config dataclass."""
    import yaml
    from dataclasses import fields

    from kn_edit.editing.registry import method_config

    path = METHODS_DIR / f"{name}.yaml"
    defaults = method_config(name)
    assert method_config(name, [path]) == defaults
    assert set(yaml.safe_load(path.read_text())) == {f.name for f in fields(defaults)}


def _facts_file(path: Path, lines: list[dict]) -> Path:
    import json

    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


FACTS = [{"subject": "France", "relation": "capital", "object": "Paris", "new": "Rome", "prompts": ["The capital of [X] is"]},
         {"subject": "Japan", "relation": "capital", "object": "Tokyo", "new": "Berlin", "prompts": ["The capital of [X] is"]}]  # fmt: skip


def test_update_fact_with_a_facts_file_edits_them_all_in_one_patch(saved_tiny, tmp_path, capsys):
    facts = _facts_file(tmp_path / "facts.jsonl", FACTS)
    patch = tmp_path / "batch.safetensors"
    assert main(["update-fact", "--model", str(saved_tiny), "--facts", str(facts), "--method", "kn-unscaled", "--force",
                 "--quiet", "steps=2", "generic_filter=false", "--save-patch", str(patch)]) == 0
    out = capsys.readouterr().out
    assert "facts hold on every prompt" in out and "patch written" in out
    from kn_edit.editing import read_patch

    meta, _ = read_patch(patch)
    assert [(r["subject"], r["new"]) for r in meta["requests"]] == [("France", "Rome"), ("Japan", "Berlin")]
    km = kn_edit.load(str(saved_tiny), device="cpu")
    state = snapshot(km)
    edit = kn_edit.apply_patch(km, patch)
    edit.revert()
    assert_same(km, state)


@pytest.mark.parametrize("lines, message", [
    ([FACTS[0], {"subject": "Japan", "relation": "capital"}], "facts.jsonl:2: 'object' must be"),
    ([FACTS[0], dict(FACTS[0], new="Madrid")], "facts.jsonl:2: 'France' (capital) is already edited to 'Rome' on line 1"),
    ([dict(FACTS[0], new="Paris")], "nothing to edit"),
    ([{k: v for k, v in FACTS[0].items() if k != "new"}], "'new' must be a non-empty string"),
])  # fmt: skip
def test_a_bad_facts_file_applies_nothing(saved_tiny, tmp_path, capsys, lines, message):
    facts = _facts_file(tmp_path / "facts.jsonl", lines)
    before = sorted(p.name for p in tmp_path.iterdir())
    assert main(["update-fact", "--model", str(saved_tiny), "--facts", str(facts), "--method", "kn-unscaled", "--force",
                 "--quiet", "--save-patch", str(tmp_path / "p.safetensors")]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no patch written


def test_facts_file_or_one_fact_not_both(saved_tiny, tmp_path, capsys):
    facts = _facts_file(tmp_path / "facts.jsonl", FACTS)
    assert main(["update-fact", "--model", str(saved_tiny), "--facts", str(facts), "-p", "The capital of France is"]) == 2
    assert "not both" in capsys.readouterr().err
    assert main(["update-fact", "--model", str(saved_tiny), "-p", "The capital of France is", "--old", "Paris"]) == 2
    assert "missing --new" in capsys.readouterr().err


def _memit_args(tmp_path: Path) -> list[str]:
    from tiny_models import CORPUS

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(CORPUS))
    # tiny random models need a loose norm bound for the target to move the answer at all
    return ["--method", "memit", "--quiet", f"cov_corpus={corpus}", f"cache_dir={tmp_path / 'cache'}", "layers=[0,1]",
            "n_prefixes=1", "prefix_length=3", "steps=2", "clamp_norm_factor=10000"]


def test_memit_edits_a_facts_file_in_one_patch_over_its_layers(saved_tiny, tmp_path, capsys):
    facts = _facts_file(tmp_path / "facts.jsonl", FACTS)
    patch = tmp_path / "memit.safetensors"
    assert main(["update-fact", "--model", str(saved_tiny), "--facts", str(facts), *_memit_args(tmp_path),
                 "--save-patch", str(patch), "--force"]) == 0
    assert "facts hold on every prompt" in capsys.readouterr().out
    from kn_edit.editing import read_patch

    meta, _ = read_patch(patch)
    assert [(r["subject"], r["new"]) for r in meta["requests"]] == [("France", "Rome"), ("Japan", "Berlin")]
    km = kn_edit.load(str(saved_tiny), device="cpu")
    state = snapshot(km)
    edit = kn_edit.apply_patch(km, patch)
    assert sorted(edit.touched_parameters) == sorted(kn_edit.editing.values.value_location(km, l)[0] for l in (0, 1))
    edit.revert()
    assert_same(km, state)


def test_memit_with_a_malformed_facts_line_applies_nothing(saved_tiny, tmp_path, capsys):
    facts = tmp_path / "facts.jsonl"
    facts.write_text(json.dumps(FACTS[0]) + "\n{\"subject\": \"Japan\",\n")
    before = sorted(p.name for p in tmp_path.iterdir())
    assert main(["update-fact", "--model", str(saved_tiny), "--facts", str(facts), *_memit_args(tmp_path),
                 "--save-patch", str(tmp_path / "p.safetensors")]) == 2
    err = capsys.readouterr().err
    assert "facts.jsonl:2: not valid JSON" in err and err.count("\n") == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(before + ["corpus.txt"])  # no patch, no statistics


@pytest.mark.parametrize("family", ["llama", "bert"])
def test_the_before_after_snapshot_equals_predict_and_prob_per_prompt(tiny_factory, family):
    """update-fact's table (one batched pass) shows what km.predict and km.prob give prompt by prompt."""
    from kn_edit.cli.edit import _snapshot

    km = tiny_factory(family)
    mask = " [MASK]." if km.is_masked_lm else ""
    prompts = [f"The capital of France is{mask}", f"Tokyo is a city in{mask}", f"Rome{mask}"]
    objects = ["Paris", "Rome"]
    got = _snapshot(km, prompts, objects)
    for prompt, row in zip(prompts, got):
        top = km.predict(prompt, top_k=1)[0]
        assert row["top"] == top.token and row["top_p"] == pytest.approx(top.prob, rel=1e-4)
        for o in objects:
            assert row[o] == pytest.approx(km.prob(prompt, o), rel=1e-4, abs=1e-12)
    alone = _snapshot(km, prompts, [])  # controls: no objects
    assert [set(r) for r in alone] == [{"top", "top_p"}] * len(prompts)
    assert [(r["top"], pytest.approx(r["top_p"], rel=1e-4)) for r in got] == [(r["top"], r["top_p"]) for r in alone]
