"""The edit ledger: stacked edits revert in any order bit for bit, and an edit that fails half-way leaves the
model as it was."""

from __future__ import annotations

import itertools

import pytest
import torch

import kn_edit
from helpers import changed, same, snapshot
from kn_edit import EditError, Neuron
from kn_edit.editing import ledger as ledger_module
from kn_edit.editing.ledger import ledger_for
from kn_edit.editing.values import value_location

PROMPT = "The capital of France is"


def three_edits(km):
    """Three overlapping edits of different kinds: 1:5 is touched by all three, 0:3 by two."""
    a = kn_edit.update_fact(km, [PROMPT], "Paris", "Rome", rule="paper", neurons=[Neuron(0, 3), Neuron(1, 5)], force=True)
    b = kn_edit.erase_fact(km, [PROMPT], "Paris", neurons=[Neuron(1, 5), Neuron(1, 6)], force=True)
    c = kn_edit.update_fact(km, [PROMPT], "Paris", "Tokyo", rule="unscaled",
                            neurons=[Neuron(0, 3), Neuron(1, 5), Neuron(1, 9)], force=True)
    return [a, b, c]


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_any_revert_order_restores_bit_for_bit(tiny_factory, family):
    km = tiny_factory(family)
    original = snapshot(km)
    for order in itertools.permutations(range(3)):
        edits = three_edits(km)
        assert changed(km, original) == sorted(value_location(km, l)[0] for l in (0, 1))
        for k, i in enumerate(order):
            edits[i].revert()
            assert not edits[i].active
            if k < 2:
                assert len(ledger_for(km).active_edits) == 2 - k
        assert same(km, original), f"order {order}"
        assert ledger_for(km).touched_rows == {}


def test_reverting_the_last_edit_gives_the_state_before_it(tiny_factory):
    km = tiny_factory("qwen2")
    a = kn_edit.update_fact(km, [PROMPT], "Paris", "Rome", rule="paper", neurons=[Neuron(1, 5)], force=True)
    after_a = snapshot(km)
    b = kn_edit.update_fact(km, [PROMPT], "Paris", "Tokyo", rule="paper", neurons=[Neuron(1, 5), Neuron(0, 1)], force=True)
    b.revert()
    assert same(km, after_a)
    a.revert()


def test_reverting_an_earlier_edit_keeps_the_later_one(tiny_factory):
    """Additive edits compose: with A reverted, B's delta stays on the pristine value."""
    km = tiny_factory("llama")
    n = Neuron(1, 5)
    pristine = km.value_vectors(1)[5].detach().clone()
    a = kn_edit.update_fact(km, [PROMPT], "Paris", "Rome", rule="unscaled", neurons=[n], force=True)
    b = kn_edit.update_fact(km, [PROMPT], "Paris", "Tokyo", rule="unscaled", neurons=[n], force=True)
    delta_b = b.patches[0].delta.squeeze()
    a.revert()
    assert torch.equal(km.value_vectors(1)[5].detach(), pristine + delta_b)
    b.revert()
    assert torch.equal(km.value_vectors(1)[5].detach(), pristine)


def test_revert_twice_is_an_error(tiny_factory):
    km = tiny_factory("gpt2")
    edit = kn_edit.erase_fact(km, [PROMPT], "Paris", neurons=[Neuron(0, 1)], force=True)
    edit.revert()
    with pytest.raises(EditError, match="already reverted"):
        edit.revert()


@pytest.mark.parametrize("family", ["gpt2", "gemma3"])
def test_failure_half_way_through_apply_leaves_the_model_unchanged(tiny_factory, monkeypatch, family):
    km = tiny_factory(family)
    earlier = kn_edit.update_fact(km, [PROMPT], "Paris", "Rome", rule="unscaled", neurons=[Neuron(1, 5)], force=True)
    state = snapshot(km)
    real = ledger_module.Ledger._write
    calls = {"n": 0}

    def failing(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:  # the first layer is written, the second fails
            raise RuntimeError("injected failure")
        return real(*args, **kwargs)

    monkeypatch.setattr(ledger_module.Ledger, "_write", failing)
    with pytest.raises(RuntimeError, match="injected"):
        kn_edit.update_fact(km, [PROMPT], "Paris", "Tokyo", rule="paper", neurons=[Neuron(0, 2), Neuron(1, 5)], force=True)
    monkeypatch.setattr(ledger_module.Ledger, "_write", real)
    assert calls["n"] >= 2
    assert same(km, state)
    assert ledger_for(km).active_edits == [earlier]
    earlier.revert()
    assert ledger_for(km).touched_rows == {}


@pytest.mark.parametrize("direction", ["gradient", "contrast"])
def test_interrupted_scale_search_leaves_the_model_unchanged(tiny_factory, monkeypatch, direction):
    from kn_edit.editing import knowledge_neurons

    km = tiny_factory("llama")
    state = snapshot(km)
    real = knowledge_neurons.margins
    calls = {"n": 0}

    def interrupted(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(knowledge_neurons, "margins", interrupted)
    with pytest.raises(KeyboardInterrupt):
        kn_edit.update_fact(km, [PROMPT], "Paris", "Rome", neurons=[Neuron(1, i) for i in range(6)], force=True,
                            generic_filter=False, direction=direction, max_change=1e6)
    assert same(km, state)
    assert ledger_for(km).active_edits == []


def test_changes_are_checked(tiny_factory):
    km = tiny_factory("gpt2")
    name = next(n for n, p in km.model.named_parameters() if p is km.value_weight(0))
    with pytest.raises(EditError, match="no parameter"):
        ledger_module.commit(km, "x", [], [ledger_module.SliceChange("nope.weight", 0, torch.tensor([0]), torch.zeros(1, 32))])
    with pytest.raises(EditError, match="out of range"):
        ledger_module.commit(km, "x", [], [ledger_module.SliceChange(name, 0, torch.tensor([10**6]), torch.zeros(1, 32))])
    with pytest.raises(EditError, match="shape"):
        ledger_module.commit(km, "x", [], [ledger_module.SliceChange(name, 0, torch.tensor([0]), torch.zeros(1, 5))])
    assert ledger_for(km).active_edits == []
