"""The paper's second finding on the real smollm2-135m: a known fact's own prompts activate its knowledge neurons
more than unrelated prompts do."""

from __future__ import annotations

import pytest
import torch

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
    own_acts = prompt_activations(smollm2, OWN, neurons)  # [prompts, neurons]
    other_acts = prompt_activations(smollm2, UNRELATED, neurons)
    # Oriented (the analysis' default): each neuron's activation times the sign of its mean on the own prompts.
    sign = torch.where(own_acts.mean(dim=0) < 0, -1.0, 1.0)
    own, other = (own_acts * sign).mean(dim=1), (other_acts * sign).mean(dim=1)  # [prompts]
    margin = float(own.mean() - other.mean())
    raw = float(own_acts.mean() - other_acts.mean())
    print(f"\n{len(neurons)} neurons; oriented: own {float(own.mean()):.4f}, unrelated {float(other.mean()):.4f}, "
          f"margin {margin:.4f}; weakest own prompt {float(own.min()):.4f} vs strongest unrelated "
          f"{float(other.max()):.4f}; raw margin {raw:.4f}")
    assert margin > 0 and float(own.min()) > float(other.mean())
