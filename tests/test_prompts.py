"""The prompt/answer convention and KnModel's probabilities, checked against plain forward passes."""

from __future__ import annotations

import pytest
import torch

import kn_edit
from kn_edit.models.prompts import causal_prompt, join_target


def test_space_is_inserted_once():
    assert join_target("The capital of France is", "Paris") == ("The capital of France is", " Paris")
    assert join_target("The capital of France is", " Paris") == ("The capital of France is", " Paris")
    assert join_target("The capital of France is ", "Paris") == ("The capital of France is", " Paris")


def test_paris_and_space_paris_mean_the_same(tiny_factory):
    km = tiny_factory("gpt2")
    a = km.encode("The capital of France is", "Paris")
    b = km.encode("The capital of France is", " Paris")
    c = km.encode("The capital of France is ", "Paris")
    assert a.target_ids == b.target_ids == c.target_ids
    assert torch.equal(a.steps[0].input_ids, b.steps[0].input_ids)


def test_pattern_slot_at_the_end_is_cut_and_elsewhere_rejected():
    assert causal_prompt("[X] is the capital of [Y].") == "[X] is the capital of "
    with pytest.raises(kn_edit.PromptError, match="answer slot"):
        causal_prompt("[Y] is the capital of France.")


def test_multi_token_target_is_teacher_forced(tiny_factory):
    km = tiny_factory("llama")
    enc = km.encode("The capital of France is", "Paris, France")
    assert len(enc.target_ids) > 1
    full = enc.steps[-1].input_ids
    for j, step in enumerate(enc.steps):
        assert step.target_id == enc.target_ids[j]
        assert step.position == len(step.input_ids) - 1
        assert torch.equal(step.input_ids, full[: len(step.input_ids)])
    # prob is the product of the teacher-forced token probabilities, from one plain forward pass.
    with torch.no_grad():
        ids = torch.tensor(list(enc.steps[0].input_ids) + list(enc.target_ids))[None]
        logp = torch.log_softmax(km.model(ids).logits[0], dim=-1)
    start = enc.steps[0].position
    expected = sum(float(logp[start + j, t]) for j, t in enumerate(enc.target_ids))
    assert km.log_prob("The capital of France is", "Paris, France") == pytest.approx(expected, abs=1e-5)


def test_masked_prompt_slots(tiny_factory):
    km = tiny_factory("bert")
    a = km.encode("The capital of France is [MASK].", "paris")
    b = km.encode("The capital of France is [Y].", "paris")
    assert torch.equal(a.steps[0].input_ids, b.steps[0].input_ids)
    assert a.steps[0].input_ids[a.steps[0].position] == km.tokenizer.mask_token_id
    with pytest.raises(kn_edit.PromptError, match="exactly one answer slot"):
        km.encode("The capital of France is Paris.", "paris")
    with pytest.raises(kn_edit.PromptError, match="exactly one answer slot"):
        km.predict("no slot here")


def test_masked_multi_token_teacher_forcing(tiny_factory):
    km = tiny_factory("bert")
    enc = km.encode("[MASK] is the capital.", "danielle darrieux")
    assert len(enc.steps) == len(enc.target_ids) > 1
    for j, step in enumerate(enc.steps):
        ids = step.input_ids.tolist()
        assert ids[step.position] == km.tokenizer.mask_token_id
        assert ids[step.position - j : step.position] == list(enc.target_ids[:j])


@pytest.mark.parametrize("prompt,target,error", [
    ("", "Paris", kn_edit.PromptError),
    ("   ", "Paris", kn_edit.PromptError),
    ("The capital of France is", "", kn_edit.TargetError),
    ("The capital of France is", "  ", kn_edit.TargetError),
])
def test_empty_prompt_or_target_is_a_clear_error(tiny_factory, prompt, target, error):
    km = tiny_factory("gpt2")
    with pytest.raises(error):
        km.encode(prompt, target)


def test_unknown_token_target_is_rejected(tiny_factory):
    km = tiny_factory("bert")
    with pytest.raises(kn_edit.TargetError, match="cannot express"):
        km.encode("The capital of France is [MASK].", "日本")


def test_predict_and_prob_agree_with_a_plain_forward(tiny):
    prompt, target = ("The capital of France is [MASK].", "paris") if tiny.is_masked_lm else ("The capital of France is", "Paris")
    step = tiny.encode(prompt, target).steps[0]
    with torch.no_grad():
        probs = torch.softmax(tiny.model(step.input_ids[None]).logits[0, step.position], dim=-1)
    assert tiny.prob(prompt, target) == pytest.approx(float(probs[step.target_id]), rel=1e-5)
    top = tiny.predict(prompt, top_k=3)
    assert [p.token_id for p in top] == probs.topk(3).indices.tolist()
    assert top[0].prob == pytest.approx(float(probs.max()), rel=1e-5)


def test_batched_right_padding_gives_the_same_logits(tiny):
    prompts = (["The [MASK] of France is Paris.", "[MASK] is in Japan."] if tiny.is_masked_lm
               else ["The capital of France is", "Tokyo is a city in"])
    steps = [tiny.encode(p, "paris" if tiny.is_masked_lm else "Paris").steps[0] for p in prompts]
    batched = tiny.step_logits(steps)
    for i, step in enumerate(steps):
        single = tiny.step_logits([step])[0]
        torch.testing.assert_close(batched[i], single, rtol=1e-4, atol=1e-5)
