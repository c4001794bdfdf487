"""Generic-neuron filters, relation-level erasure and the scale search, on plain inputs and a tiny model."""

from __future__ import annotations

import pytest
import torch

import kn_edit
from helpers import assert_same, snapshot
from kn_edit import ConfigError, EditError, EditRequest, Neuron
from kn_edit.editing.filters import drop_generic, drop_relation_shared, shared_by, slot_activations
from kn_edit.editing.knowledge_neurons import search_scale

A, B, C, D = Neuron(0, 1), Neuron(0, 2), Neuron(1, 3), Neuron(1, 4)


def test_relation_share_filter_drops_neurons_of_more_than_the_share():
    sets = [{A, B}, {A}, {A, C}] + [{D}] * 7  # A in 3 of 10 facts, B and C in 1
    kept, dropped = drop_relation_shared([A, B, C], sets, max_share=0.1)
    assert kept == [B, C] and dropped == [A]  # 1/10 is not more than 10 %
    assert shared_by(sets, 0.1) == [A, B, C, D]
    assert shared_by(sets, 0.3) == [A, D]
    with pytest.raises(ConfigError):
        shared_by(sets, 0.0)


def test_generic_filter_compares_generic_and_fact_activation():
    generic = torch.zeros(2, 8)
    generic[0, 1], generic[0, 2], generic[1, 3] = 5.0, 0.4, 1.0
    kept, dropped = drop_generic([A, B, C], torch.tensor([6.0, 4.0, 2.5]), generic, ratio=0.5)
    assert kept == [B, C] and dropped == [A]  # 5 >= 0.5 * 6 dropped; 0.4 < 2 and 1.0 < 1.25 kept
    kept, dropped = drop_generic([C], torch.tensor([1.9]), generic, ratio=0.5)
    assert dropped == [C]


def test_slot_activations_is_a_quantile_over_prompts(tiny_factory):
    km = tiny_factory("llama")
    prompts = ["The capital of France is", "Rome is located in", "Tokyo is a city in"]
    acts = torch.stack([km.activations([km.encode(p, "Paris").steps[0]])[0] for p in prompts]).abs()  # [3, L, d_ff]
    torch.testing.assert_close(slot_activations(km, prompts, 1.0), acts.max(dim=0).values)
    torch.testing.assert_close(slot_activations(km, prompts, 0.5), acts.median(dim=0).values)


def test_search_scale_finds_the_smallest_scale():
    tries = []

    def margin(scale):
        tries.append(scale)
        return scale - 10.0  # the margin 1.0 holds from scale 11 on

    found, reached = search_scale(margin, 1.0, initial=1.0, maximum=1000.0, bisect_steps=10)
    assert reached
    assert 11.0 <= found < 11.02
    assert tries[:5] == [1, 2, 4, 8, 16]
    assert search_scale(lambda s: -1.0, 0.0, 1.0, 8.0, 3) == (8.0, False)  # never holds: the largest scale tried


def test_erase_relation_zeroes_the_shared_neurons(tiny_factory):
    km = tiny_factory("gpt2")
    before = snapshot(km)
    facts = [EditRequest(("The capital of France is",), "Paris"), EditRequest(("The capital of Italy is",), "Rome"),
             EditRequest(("The capital of Japan is",), "Tokyo")]
    edit = kn_edit.erase_relation(km, facts, share=0.5, neuron_sets=[{A, B}, {A}, {C}])
    assert [(n.layer, n.index, c) for n, c in zip(edit.report.neurons, edit.report.details.relation_counts)] == [(0, 1, 2)]
    assert torch.equal(km.value_vectors(0)[1], torch.zeros(km.d_model))
    assert torch.equal(km.value_vectors(0)[2], before_vector(km, before, B))
    edit.revert()
    assert_same(km, before)
    with pytest.raises(EditError, match="no neuron is shared"):
        kn_edit.erase_relation(km, facts, share=1.0, neuron_sets=[{A}, {B}, {C}])


def before_vector(km, before, n: Neuron) -> torch.Tensor:
    name = next(k for k, p in km.model.named_parameters() if p is km.value_weight(n.layer))
    return before[name][n.index]  # GPT-2 Conv1D: value vectors are rows


# ----- the relation-share filter inside the editor, and its fallback ---------------------------------------
LOCATED = [Neuron(1, i) for i in range(8)]
SHARED = [set(LOCATED[1:])] * 10  # the relation's other facts: every located neuron but 1:0 is shared by all


def _editor(**settings):
    from kn_edit.editing import KnowledgeNeuronEditor, Located

    locator = lambda *_: Located(list(LOCATED), [1.0] * len(LOCATED))  # noqa: E731
    return KnowledgeNeuronEditor(locator=locator, relation_neurons={"P1": SHARED}, force=True, generic_filter=False,
                                 margin=0.1, max_change=1e4, **settings)


def test_relation_filter_edits_only_the_relation_specific_neurons(tiny_factory):

    km = tiny_factory("llama")
    edit = _editor().apply(km, [EditRequest(["The capital of France is"], "Paris", "Rome", relation="P1")])
    info = edit.report.details.requests[0]
    assert [(r.layer, r.index) for r in info.neurons] == [(1, 0)] and info.fallback is None
    assert sorted((d.layer, d.index) for d in info.dropped) == [(1, i) for i in range(1, 8)]
    edit.revert()


def test_relation_filter_falls_back_when_its_neurons_cannot_carry_the_edit(tiny_factory, monkeypatch):
    from kn_edit.editing import KnowledgeNeuronEditor

    km = tiny_factory("llama")
    before = snapshot(km)
    real = KnowledgeNeuronEditor._attempt

    def weak_alone(self, km_, plan, neurons, deltas):  # the single relation-specific neuron "cannot" reach it
        change, scale, reached = real(self, km_, plan, neurons, deltas)
        return change, scale, reached and len(plan.neurons) > 1

    monkeypatch.setattr(KnowledgeNeuronEditor, "_attempt", weak_alone)
    request = EditRequest(["The capital of France is"], "Paris", "Rome", relation="P1")
    edit = _editor().apply(km, [request])
    info = edit.report.details.requests[0]
    assert len(info.neurons) == 8 and info.fallback == "the relation-specific neurons did not reach the margin"
    assert edit.report.success
    edit.revert()
    with pytest.raises(EditError, match="no change within"):
        _editor(relation_fallback=False).apply(km, [request])
    assert_same(km, before)


def test_relation_filter_falls_back_when_it_leaves_no_neuron(tiny_factory):

    km = tiny_factory("llama")
    request = EditRequest(["The capital of France is"], "Paris", "Rome", relation="P1")
    everything = {"P1": [set(LOCATED)] * 10}
    editor = _editor()
    editor.relation_neurons = everything
    edit = editor.apply(km, [request])
    assert edit.report.details.requests[0].fallback == "the relation-share filter left no neuron"
    assert len(edit.report.details.requests[0].neurons) == 8
    edit.revert()
    strict = _editor(relation_fallback=False)
    strict.relation_neurons = everything
    with pytest.raises(EditError, match="no knowledge neurons"):
        strict.apply(km, [request])
