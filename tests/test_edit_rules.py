"""Knowledge-neuron update and erase rules on tiny models of every family: the value vectors change exactly as
the formulas say (checked against a plain computation from the raw weights), nothing else changes, and
revert() restores every parameter bit for bit."""

from __future__ import annotations

import pytest
import torch

import kn_edit
from helpers import RULE_NEURONS as NEURONS  # the three neurons the rule tests edit
from helpers import assert_only_neurons_changed, assert_same, new_object, raw_value, snapshot
from kn_edit import EditError, Neuron
from tiny_models import prompt_for


# ----- plain reference: read everything from the raw modules, not through kn_edit (raw_value: helpers) -----
def raw_E(km, ids) -> torch.Tensor:
    head = km.model.get_output_embeddings()
    return head.weight[list(ids)].detach().float().mean(dim=0)


def raw_activation(km, prompt: str, target: str, n: Neuron) -> float:
    step = km.encode(prompt, target).steps[0]
    seen = {}

    def grab(_module, args):
        seen["a"] = args[0][0, step.position, n.index].item()

    handle = km.value_proj(n.layer).register_forward_pre_hook(grab)
    try:
        with torch.no_grad():
            km.model(input_ids=step.input_ids[None])
    finally:
        handle.remove()
    return seen["a"]


def test_paper_rule_formula(tiny):
    prompt, old = prompt_for(tiny.adapter.family)
    new = new_object(tiny)
    before = snapshot(tiny)
    e_old = raw_E(tiny, tiny.encode(prompt, old).target_ids)
    e_new = raw_E(tiny, tiny.encode(prompt, new).target_ids)
    expected = {}
    for n in NEURONS:
        v = raw_value(tiny, n)
        expected[n] = v - 1.0 * (v.norm() / e_old.norm()) * e_old + 8.0 * (v.norm() / e_new.norm()) * e_new
    edit = kn_edit.update_fact(tiny, [prompt], old, new, rule="paper", neurons=NEURONS, force=True)
    assert edit.report.details.rule == "paper" and edit.active
    assert_only_neurons_changed(tiny, before, NEURONS, expected)
    names = {k for k, p in tiny.model.named_parameters() if p is tiny.value_proj(0).weight or p is tiny.value_proj(1).weight}
    assert set(edit.touched_parameters) == names
    edit.revert()
    assert_same(tiny, before)


def test_unscaled_rule_formula(tiny):
    prompt, old = prompt_for(tiny.adapter.family)
    new = new_object(tiny)
    before = snapshot(tiny)
    e_old = raw_E(tiny, tiny.encode(prompt, old).target_ids)
    e_new = raw_E(tiny, tiny.encode(prompt, new).target_ids)
    expected = {n: raw_value(tiny, n) - 2 * e_old + 2 * e_new for n in NEURONS}
    edit = kn_edit.update_fact(tiny, [prompt], old, new, rule="unscaled", neurons=NEURONS, force=True)
    assert_only_neurons_changed(tiny, before, NEURONS, expected)
    edit.revert()
    assert_same(tiny, before)


def test_signed_rule_formula(tiny):
    """contrast direction: v_i += s * a_i / sum_j a_j^2 * unit(E(new) - E(old)), s the reported scale."""
    prompt, old = prompt_for(tiny.adapter.family)
    new = new_object(tiny)
    before = snapshot(tiny)
    t_old, t_new = tiny.encode(prompt, old).target_ids, tiny.encode(prompt, new).target_ids
    split = next(j for j, (a, b) in enumerate(zip(t_old, t_new)) if a != b)
    assert split == 0  # the reference below reads activations at the first answer step
    acts = torch.tensor([raw_activation(tiny, prompt, new, n) for n in NEURONS])
    v0 = {n: raw_value(tiny, n) for n in NEURONS}
    d = raw_E(tiny, [t_new[0]]) - raw_E(tiny, [t_old[0]])
    d = d / d.norm()
    edit = kn_edit.update_fact(tiny, [prompt], old, new, neurons=NEURONS, force=True, generic_filter=False,
                               direction="contrast", max_scale=64.0, bisect_steps=3, on_failure="apply",
                               max_text_change=None)  # the formula, not the guard (tested on its own)
    scale = edit.report.details.scale
    assert edit.report.details.rule == "signed" and 0 < scale <= 64.0
    expected = {n: v0[n] + scale * float(a) / float((acts**2).sum()) * d for n, a in zip(NEURONS, acts)}
    assert_only_neurons_changed(tiny, before, NEURONS, expected, atol=1e-5)
    edit.revert()
    assert_same(tiny, before)


def test_signed_rule_reaches_the_margin_on_a_causal_model(tiny_factory):
    km = tiny_factory("llama")
    edit = kn_edit.update_fact(km, ["The capital of France is"], "Paris", "Rome", neurons=[Neuron(1, i) for i in range(8)],
                               force=True, generic_filter=False, margin=0.1, direction="contrast")
    assert edit.report.success
    assert min(p.margin for p in edit.report.prompts) >= 0.1
    top = km.predict("The capital of France is", top_k=1)[0]
    assert top.token.strip() == "Rome"
    edit.revert()


@pytest.mark.parametrize("mode", ["zero", "unk"])
def test_erase_sets_value_vectors(tiny, mode):
    prompt, target = prompt_for(tiny.adapter.family)
    before = snapshot(tiny)
    unk = tiny.tokenizer.unk_token_id
    if mode == "unk" and unk is None:
        with pytest.raises(EditError, match="unknown token"):
            kn_edit.erase_fact(tiny, [prompt], target, mode=mode, neurons=NEURONS, force=True)
        assert_same(tiny, before)
        return
    value = torch.zeros(tiny.d_model) if mode == "zero" else raw_E(tiny, [unk])
    edit = kn_edit.erase_fact(tiny, [prompt], target, mode=mode, neurons=NEURONS, force=True)
    assert_only_neurons_changed(tiny, before, NEURONS, {n: value for n in NEURONS}, atol=0)
    edit.revert()
    assert_same(tiny, before)


def test_batch_of_requests_adds_the_deltas_of_shared_neurons(tiny_factory):
    km = tiny_factory("gpt2")
    before = snapshot(km)
    r1 = kn_edit.EditRequest(("The capital of France is",), "Paris", "Rome")
    r2 = kn_edit.EditRequest(("The capital of Italy is",), "Rome", "Tokyo")
    shared = Neuron(1, 5)
    editor = kn_edit.KnowledgeNeuronEditor(rule="unscaled", force=True, neurons=[[shared, Neuron(0, 1)], [shared]])
    e = {x: raw_E(km, km.encode("The capital of France is", x).target_ids) for x in ("Paris", "Rome", "Tokyo")}
    v = raw_value(km, shared)
    edit = editor.apply(km, [r1, r2])
    expected = v + (-2 * e["Paris"] + 2 * e["Rome"]) + (-2 * e["Rome"] + 2 * e["Tokyo"])
    torch.testing.assert_close(raw_value(km, shared), expected, atol=1e-5, rtol=1e-5)
    assert len(edit.report.details.requests) == 2
    edit.revert()
    assert_same(km, before)


def test_multi_token_objects_use_the_mean_embedding(tiny_factory):
    km = tiny_factory("gpt2")
    prompt = "The capital of France is"
    old, new = "Paris", "Madrid, Spain"
    ids_new = km.encode(prompt, new).target_ids
    assert len(ids_new) > 1
    e_old, e_new = raw_E(km, km.encode(prompt, old).target_ids), raw_E(km, ids_new)
    n = Neuron(1, 2)
    expected = raw_value(km, n) - 2 * e_old + 2 * e_new
    edit = kn_edit.update_fact(km, [prompt], old, new, rule="unscaled", neurons=[n], force=True)
    torch.testing.assert_close(raw_value(km, n), expected, atol=1e-6, rtol=1e-6)
    edit.revert()


def test_signed_rule_that_cannot_reach_the_margin_raises_and_changes_nothing(tiny_factory):
    km = tiny_factory("llama")
    before = snapshot(km)
    with pytest.raises(kn_edit.EditError, match="no scale up to max_scale=2"):
        kn_edit.update_fact(km, ["The capital of France is"], "Paris", "Rome", neurons=NEURONS, force=True,
                            generic_filter=False, margin=50.0, max_scale=2.0, direction="contrast")
    assert_same(km, before)
    for limits in ({"solve_steps": 1}, {"max_change": 1e-3}):
        with pytest.raises(kn_edit.EditError, match="no change within"):
            kn_edit.update_fact(km, ["The capital of France is"], "Paris", "Rome", neurons=NEURONS, force=True,
                                margin=50.0, **limits)
        assert_same(km, before)
    with pytest.raises(kn_edit.ConfigError, match="on_failure"):
        kn_edit.update_fact(km, ["The capital of France is"], "Paris", "Rome", neurons=NEURONS, force=True,
                            on_failure="maybe")
