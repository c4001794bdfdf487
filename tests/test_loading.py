"""Loading by name, folder and in-memory wrap; clear errors for what cannot be loaded."""

from __future__ import annotations

import pytest

import kn_edit
from kn_edit.cli import main
from kn_edit.models.provision import OFFLINE_MODELS, cache_root


def test_unknown_model_name_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(kn_edit.UnknownModelError, match="smollm2-135m"):
        kn_edit.load("no-such-model-anywhere")


def test_missing_local_paths_are_clear_errors(tmp_path):
    with pytest.raises(kn_edit.UnknownModelError, match="no such model"):
        kn_edit.load(str(tmp_path / "missing.gguf"))
    with pytest.raises(kn_edit.UnknownModelError, match="no config.json"):
        kn_edit.load(str(tmp_path))
    with pytest.raises(kn_edit.UnknownModelError, match="empty"):
        kn_edit.load("")


def test_wrap_needs_model_and_tokenizer():
    with pytest.raises(kn_edit.KnEditError):
        kn_edit.wrap(None, None)


def test_saved_folder_loads_with_identical_logits(tiny_factory, tmp_path):
    import torch

    km = tiny_factory("llama")
    km.model.save_pretrained(tmp_path / "m")
    km.tokenizer.save_pretrained(tmp_path / "m")
    again = kn_edit.load(str(tmp_path / "m"), device="cpu")
    step = km.encode("The capital of France is", "Paris").steps
    ids, mask = km.pad([s.input_ids for s in step])
    with torch.no_grad():  # the forward bit for bit; scoring's one-row head product may round by 1 ulp
        assert torch.equal(km.model(input_ids=ids, attention_mask=mask).logits,
                           again.model(input_ids=ids, attention_mask=mask).logits)
    assert torch.allclose(km.step_logits(step), again.step_logits(step), rtol=0, atol=1e-6)
    assert again.source == (tmp_path / "m").resolve()


def test_cache_root_follows_env(monkeypatch, tmp_path):
    monkeypatch.setenv("KN_EDIT_CACHE", str(tmp_path))
    assert cache_root() == tmp_path


def test_cli_errors_are_one_line_not_tracebacks(capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert main(["predict", "--model", "no-such-model", "hello"]) == 2
    err = capsys.readouterr().err
    assert "error:" in err and "Traceback" not in err


def test_cli_models_lists_offline_models(capsys):
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    for name in OFFLINE_MODELS:
        assert name in out


def test_cli_without_command_prints_help(capsys):
    assert main([]) == 2
    assert "usage: kn-edit" in capsys.readouterr().out
