"""Patch files and saved models: round trips bit for bit, atomic writes, refusals with clear errors."""

from __future__ import annotations

import pytest
import torch

import kn_edit
from helpers import changed, new_object, same, snapshot
from kn_edit import EditError, Neuron
from kn_edit.editing import apply_patch, read_patch, remove_patch
from kn_edit.editing.values import value_location
from tiny_models import prompt_for

NEURONS = [Neuron(0, 3), Neuron(1, 5)]


def edit_of(km):
    prompt, old = prompt_for(km.adapter.family)
    return kn_edit.update_fact(km, [prompt], old, new_object(km), rule="paper", neurons=NEURONS, force=True)


def test_patch_round_trip_on_a_fresh_model(tiny_factory, tmp_path):
    km = tiny_factory("gpt2")
    edit = edit_of(km)
    edited = snapshot(km)
    path = tmp_path / "fact.kn-patch.safetensors"
    edit.save(path)
    meta, entries = read_patch(path)
    assert meta["fingerprint"] == km.fingerprint() and meta["model"] == km.name
    assert meta["info"]["details"]["rule"] == "paper" and meta["info"]["method"] == "kn-paper" and len(entries) == 2
    assert path.stat().st_size < 20_000  # the touched rows only
    assert not list(tmp_path.glob(".*partial"))

    fresh = tiny_factory("gpt2")
    original = snapshot(fresh)
    applied = apply_patch(fresh, path)
    assert same(fresh, edited)
    with pytest.raises(EditError, match="original values"):
        apply_patch(fresh, path)  # already patched
    applied.revert()
    assert same(fresh, original)


def test_remove_patch_from_a_saved_patched_model(tiny_factory, tmp_path):
    km = tiny_factory("llama")
    original = snapshot(km)
    edit = edit_of(km)
    edit.save(tmp_path / "p.safetensors")
    km.save(tmp_path / "patched")
    patched = kn_edit.load(str(tmp_path / "patched"), device="cpu")
    removal = remove_patch(patched, tmp_path / "p.safetensors")
    assert same(patched, original)
    removal.revert()
    edit.revert()
    assert changed(patched, original) == sorted(value_location(patched, l)[0] for l in (0, 1))  # the patch is back


def test_patch_for_another_model_is_refused(tiny_factory, tmp_path):
    km = tiny_factory("gpt2", n_layers=2)
    edit_of(km).save(tmp_path / "p.safetensors")
    other = tiny_factory("gpt2", n_layers=3)
    state = snapshot(other)
    with pytest.raises(EditError, match="n_layers: patch 2, model 3"):
        apply_patch(other, tmp_path / "p.safetensors")
    llama = tiny_factory("llama")
    with pytest.raises(EditError, match="family: patch 'gpt2', model 'llama'"):
        apply_patch(llama, tmp_path / "p.safetensors")
    assert same(other, state)


def test_patch_save_refuses_an_existing_path_and_bad_files(tiny_factory, tmp_path):
    km = tiny_factory("gpt2")
    edit = edit_of(km)
    path = tmp_path / "p.safetensors"
    path.write_text("keep me")
    with pytest.raises(EditError, match="already exists"):
        edit.save(path)
    assert path.read_text() == "keep me"
    with pytest.raises(EditError, match="not a kn-edit patch"):
        apply_patch(km, path)
    with pytest.raises(EditError, match="no such patch"):
        apply_patch(km, tmp_path / "missing.safetensors")


def test_saved_model_reloads_with_identical_logits(tiny, tmp_path):
    prompt, target = prompt_for(tiny.adapter.family)
    edit = edit_of(tiny)
    steps = list(tiny.encode(prompt, target).steps)
    out = tiny.save(tmp_path / "edited")
    assert (out / "config.json").is_file() and list(out.glob("*.safetensors")) and (out / "kn_edit.json").is_file()
    again = kn_edit.load(str(out), device="cpu")
    # the model's own forward, bit for bit; kn-edit's scoring sends only the answer rows through the output head,
    # where BLAS may round a one-row product differently for two copies of the same weights (1 ulp)
    ids, mask = tiny.pad([s.input_ids for s in steps])
    with torch.no_grad():
        assert torch.equal(tiny.model(input_ids=ids, attention_mask=mask).logits,
                           again.model(input_ids=ids, attention_mask=mask).logits)
    assert torch.allclose(tiny.step_logits(steps), again.step_logits(steps), rtol=0, atol=1e-6)
    state = snapshot(tiny)
    assert same(again, state)
    edit.revert()


def test_save_refuses_existing_paths_and_the_source_folder(tiny_factory, tmp_path):
    km = tiny_factory("gpt2")
    km.save(tmp_path / "m")
    loaded = kn_edit.load(str(tmp_path / "m"), device="cpu")
    with pytest.raises(EditError, match="loaded from"):
        loaded.save(tmp_path / "m")
    with pytest.raises(EditError, match="loaded from"):
        loaded.save(tmp_path / "m" / "inside")
    (tmp_path / "taken").mkdir()
    with pytest.raises(EditError, match="already exists"):
        km.save(tmp_path / "taken")


def test_interrupted_save_leaves_nothing(tiny_factory, tmp_path, monkeypatch):
    km = tiny_factory("gpt2")

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(km.tokenizer, "save_pretrained", broken)
    with pytest.raises(OSError, match="disk full"):
        km.save(tmp_path / "m")
    assert list(tmp_path.iterdir()) == []
