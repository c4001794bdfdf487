"""The paper's second finding on the real smollm2-135m: a known fact's own prompts activate its knowledge neurons
more than unrelated prompts do."""

from __future__ import annotations

import pytest

import kn_edit
from kn_edit.analysis.activations import prompt_activations

pytestmark = pytest.mark.integration

OWN = ["The capital of France is", "The capital city of France is", "The capital of France is the city of"]
UNRELATED = ["The official language of Japan is", "Albert Einstein was born in", "The author of Hamlet is",
             "The chemical symbol of gold is", "The Beatles were formed in"]


def test_own_prompts_activate_the_facts_neurons_more(smollm2):
    assert all(smollm2.predict(p, top_k=1)[0].token == " Paris" for p in OWN)  # a fact the model knows
    neurons = kn_edit.locate(smollm2, OWN, "Paris", steps=6, share=0.5)
    assert neurons
    own = prompt_activations(smollm2, OWN, neurons).mean(dim=1)  # [prompts]: mean over the fact's neurons
    other = prompt_activations(smollm2, UNRELATED, neurons).mean(dim=1)
    margin = float(own.mean() - other.mean())
    print(f"\n{len(neurons)} neurons; own {float(own.mean()):.4f}, unrelated {float(other.mean()):.4f}, "
          f"margin {margin:.4f}; weakest own prompt {float(own.min()):.4f} vs strongest unrelated {float(other.max()):.4f}")
    assert margin > 0
