"""The editor interface every method implements: the ledger with whole-parameter changes, the typed report,
and the registry of methods. Numbers are checked against plain recomputations."""

from __future__ import annotations

import itertools

import pytest
import torch

import kn_edit
from helpers import same, snapshot
from kn_edit import ConfigError, EditError, Neuron
from kn_edit.editing import EditRequest, Editor, make_editor, method_config, whole_change
from kn_edit.editing.ledger import SliceChange, commit, ledger_for
from kn_edit.editing.registry import resolve
from kn_edit.editing.report import prompt_outcomes
from kn_edit.editing.settings import Rule
from kn_edit.editing.values import value_location

PROMPT = "The capital of France is"


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_whole_parameter_edits_stack_with_slice_edits_and_revert_in_any_order(tiny_factory, family):
    km = tiny_factory(family)
    pristine = snapshot(km)
    name, _ = value_location(km, 1)
    param = km.model.get_parameter(name)
    g = torch.Generator().manual_seed(0)
    delta = torch.randn(param.shape, generator=g)
    written = torch.randn(param.shape, generator=g)

    def make(kind: str):
        if kind == "whole-add":
            return commit(km, kind, [], [whole_change(km, name, delta)])
        if kind == "whole-set":
            return commit(km, kind, [], [whole_change(km, name, written, additive=False)])
        return kn_edit.update_fact(km, [PROMPT], "Paris", "Rome", rule="unscaled", neurons=[Neuron(1, 3), Neuron(1, 5)],
                                   force=True)

    kinds = ["whole-add", "slices", "whole-set"]
    for order in itertools.permutations(range(3)):
        edits = [make(k) for k in kinds]
        # the whole-parameter patch covers every slice, in one block
        whole = edits[0].patches[0]
        assert whole.index.tolist() == list(range(param.shape[whole.dim])) and whole.after.shape == param.shape
        for i in order[:-1]:
            edits[i].revert()
        # what is left equals the remaining edit applied alone to the original weights
        left = kinds[order[-1]]
        state = snapshot(km)
        edits[order[-1]].revert()
        assert same(km, pristine)
        alone = make(left)
        assert same(km, state), (order, left)
        alone.revert()
        assert same(km, pristine) and ledger_for(km).touched_rows == {}


def test_set_then_add_within_one_edit_matches_a_plain_per_row_rule(tiny_factory):
    km = tiny_factory("llama")
    name, dim = value_location(km, 0)
    param = km.model.get_parameter(name)
    before = param.detach().clone()
    g = torch.Generator().manual_seed(1)
    rows_a, rows_b = torch.tensor([4, 1, 7]), torch.tensor([7, 2, 4])
    shape_a = list(param.shape); shape_a[dim] = 3
    a, b = torch.randn(shape_a, generator=g), torch.randn(shape_a, generator=g)
    edit = commit(km, "x", [], [SliceChange(name, dim, rows_a, a, additive=False), SliceChange(name, dim, rows_b, b)])
    expected = before.clone()
    for j, r in enumerate(rows_a.tolist()):  # set
        expected.select(dim, r).copy_(a.select(dim, j))
    for j, r in enumerate(rows_b.tolist()):  # then add
        expected.select(dim, r).add_(b.select(dim, j))
    assert torch.equal(param.detach(), expected)
    patch = edit.patches[0]
    assert patch.index.tolist() == [1, 2, 4, 7] and patch.delta is None  # mixed set/add: not a pure delta
    edit.revert()
    assert torch.equal(param.detach(), before)


def test_whole_change_must_have_the_parameter_shape(tiny_factory):
    km = tiny_factory("gpt2")
    name, _ = value_location(km, 0)
    with pytest.raises(EditError, match="shape"):
        whole_change(km, name, torch.zeros(3, 3))


def _plain_margin(km, prompt: str, target: str, erasure: bool) -> float:
    """Teacher-forced forward of prompt + target, one token at a time."""
    enc = km.encode(prompt, target)
    gaps = []
    for step in enc.steps[:1] if erasure else enc.steps:
        ids = step.input_ids[None, :]
        logits = km.model(input_ids=ids).logits[0, step.position].float()
        gold = logits[step.target_id].item()
        logits[step.target_id] = float("-inf")
        gaps.append(gold - logits.max().item())
    return -max(gaps) if erasure else min(gaps)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_prompt_outcomes_equal_a_plain_recomputation(tiny_factory, family):
    km = tiny_factory(family)
    requests = [EditRequest((PROMPT, "Paris is the capital of"), "Paris", "New York"), EditRequest((PROMPT,), "Paris")]
    got = prompt_outcomes(km, requests)
    assert [(o.prompt, o.target, o.erasure) for o in got] == [(PROMPT, "New York", False),
                                                              ("Paris is the capital of", "New York", False),
                                                              (PROMPT, "Paris", True)]
    with torch.no_grad():
        for outcome in got:
            want = _plain_margin(km, outcome.prompt, outcome.target, outcome.erasure)
            assert outcome.margin == pytest.approx(want, abs=1e-4)
            assert outcome.success == (want > 0)


def test_the_report_describes_the_edit_the_same_way_for_every_method(tiny_factory):
    km = tiny_factory("llama")
    edit = make_editor("kn-paper", overrides=["force=true"], neurons=[Neuron(1, 2), Neuron(0, 4)]).apply(
        km, [EditRequest((PROMPT,), "Paris", "Rome")])
    report = edit.report
    assert report.method == "kn-paper" and report.details.rule == "paper"
    assert sorted(report.neurons) == [Neuron(0, 4), Neuron(1, 2)]
    assert sorted(p.name for p in report.parameters) == edit.touched_parameters
    assert all(p.slices == 1 and not p.whole for p in report.parameters)
    assert report.seconds > 0 and report.peak_memory_mb > 0
    assert [p.margin for p in report.prompts] == pytest.approx([o.margin for o in prompt_outcomes(km, edit.requests)])
    plain = report.to_dict()
    assert plain["method"] == "kn-paper" and plain["details"]["rule"] == "paper" and plain["neurons"]
    edit.revert()


def test_registry_names_and_settings():
    assert make_editor("kn").name == "kn" and make_editor("kn-unscaled").settings.rule == Rule.unscaled
    assert method_config("kn-paper").rule == "paper"
    assert method_config("kn", overrides={"margin": 2.5}).margin == 2.5
    cls, presets, name = resolve("helpers:ValueVectorEditor")
    assert cls.__name__ == "ValueVectorEditor" and presets == {} and name == "helpers:ValueVectorEditor"
    assert make_editor("helpers:ValueVectorEditor", overrides=["scale=3"]).settings.scale == 3.0


@pytest.mark.parametrize("name, overrides, message", [
    ("romeo", [], "unknown method"),
    ("os:path", [], "not an editor"),
    ("no_such_module:Editor", [], "cannot import"),
    ("test_editor_interface:NoConfigEditor", [], "config_class"),
    ("kn", ["rule=magic"], "rule"),
    ("kn", ["direction=sideways"], "direction"),
    ("kn-erase", ["mode=blank"], "mode"),
    ("kn", ["margin=-1"], "margin"),
    ("kn", ["nope=1"], "nope"),
])  # fmt: skip
def test_bad_methods_and_settings_are_config_errors(name, overrides, message):
    with pytest.raises(ConfigError, match=message):
        make_editor(name, overrides=overrides)


class NoConfigEditor(Editor):
    def compute(self, km, requests):  # pragma: no cover - never built
        raise AssertionError


def test_methods_refuse_requests_they_cannot_do(tiny_factory):
    km = tiny_factory("gpt2")
    state = snapshot(km)
    with pytest.raises(EditError, match="cannot erase"):
        make_editor("kn").apply(km, [EditRequest((PROMPT,), "Paris")])
    with pytest.raises(EditError, match="only erases"):
        make_editor("kn-erase").apply(km, [EditRequest((PROMPT,), "Paris", "Rome")])
    with pytest.raises(EditError, match="no edit requests"):
        make_editor("kn").apply(km, [])
    assert same(km, state)
