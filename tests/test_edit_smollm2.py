"""The default update rule and erasure on the real smollm2-135m. To stay within a CI budget, attribution is
cheap here (m = 4 steps, layers 15-29 only); configs/compare/edit_rules_smollm2.yaml measures the rules at full size."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import kn_edit
from kn_edit.editing import default_locator

pytestmark = pytest.mark.integration

FACTS = [
    (["The capital of France is", "The capital city of France is"], "Paris", "Rome"),
    (["The official language of Germany is", "The official language spoken in Germany is"], "German", "Spanish"),
    (["The capital of Japan is", "The capital city of Japan is"], "Tokyo", "Madrid"),
]
CONTROLS = [
    "The Eiffel Tower is located in the city of",
    "The chemical symbol for gold is",
    "The currency of the United States is the",
    "The largest planet in the solar system is",
]


@pytest.fixture(scope="module")
def cached_locator():
    """Locate each fact once, cheaply, and share the result between tests."""
    cache = {}

    def locate(km, prompts, target, settings):
        key = (tuple(prompts), target)
        if key not in cache:
            cheap = dataclasses.replace(settings, steps=4, layers=list(range(15, 30)))
            cache[key] = default_locator(km, prompts, target, cheap)
        return cache[key]

    return locate


def value_weights(km) -> list[torch.Tensor]:
    return [km.value_weight(l).detach().clone() for l in range(km.n_layers)]


def top1(km, prompt: str) -> str:
    return km.predict(prompt, top_k=1)[0].token


def test_default_rule_updates_known_facts_and_keeps_others(smollm2, cached_locator):
    original = value_weights(smollm2)
    controls = {c: top1(smollm2, c) for c in CONTROLS}
    flipped, kept = 0, []
    for prompts, old, new in FACTS:
        edit = kn_edit.update_fact(smollm2, prompts, old, new, locator=cached_locator)
        try:
            info = edit.report.details.requests[0]
            assert edit.report.details.rule == "signed" and 0 < info.scale <= 2.0 and info.neurons
            if all(top1(smollm2, p).strip() == new for p in prompts):
                flipped += 1
                assert edit.report.success
            others = [c for c in CONTROLS if old not in controls[c] and new not in controls[c]]
            kept.append(sum(top1(smollm2, c) == controls[c] for c in others) / len(others))
        finally:
            edit.revert()
    assert flipped == 3, f"new object top-1 on {flipped}/3 facts"
    assert sum(kept) / len(kept) >= 0.75, kept
    assert all(torch.equal(a, b) for a, b in zip(original, value_weights(smollm2)))


def test_erasing_lowers_the_probability_of_the_target(smollm2, cached_locator):
    prompts, target, _ = FACTS[0]
    before = [smollm2.prob(p, target) for p in prompts]
    edit = kn_edit.erase_fact(smollm2, prompts, target, locator=cached_locator)
    after = [smollm2.prob(p, target) for p in prompts]
    edit.revert()
    assert edit.report.neurons
    assert all(a < b for a, b in zip(after, before)), (before, after)
    assert [smollm2.prob(p, target) for p in prompts] == before
