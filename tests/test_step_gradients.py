"""step_value_gradients (one padded forward and one backward for every answer step) against the plain
computation: per step, a forward of that prompt alone and autograd's gradient of the logit gap with respect to
the value projection's weight, read at the neuron's value vector."""

from __future__ import annotations

import pytest
import torch

from helpers import neuron_slice
from kn_edit import Neuron
from kn_edit.editing.sensitivity import step_value_gradients, value_gradients


def plain_step_gradient(km, step, old_id: int, n: Neuron) -> torch.Tensor:
    weight = km.value_proj(n.layer).weight
    with torch.enable_grad():
        logits = km.model(input_ids=step.input_ids[None]).logits[0, step.position].float()
        (grad,) = torch.autograd.grad(logits[step.target_id] - logits[old_id], weight)
    return neuron_slice(km, grad, n.index).float()


@pytest.mark.parametrize("family", ["gpt2", "llama", "bert"])
def test_each_step_gets_its_own_gradient(tiny_factory, family):
    km = tiny_factory(family)
    if km.is_masked_lm:
        prompts, new, old = ["The capital of France is [MASK].", "[MASK] is in France."], "rome", "paris"
    else:  # lengths differ (padding), and one prompt gives two answer steps
        prompts, new, old = ["The capital of France is", "France's capital city is"], "Rome Italy", "Paris"
    steps = [s for p in prompts for s in km.encode(p, new).steps]
    assert len({len(s.input_ids) for s in steps}) > 1
    old_ids = [km.encode(prompts[0], old).target_ids[0]] * len(steps)
    neurons = [Neuron(1, 5), Neuron(0, 3), Neuron(1, 7)]
    got = step_value_gradients(km, steps, neurons, old_ids)
    assert got.shape == (len(steps), len(neurons), km.d_model)
    for j, step in enumerate(steps):
        for i, n in enumerate(neurons):
            ref = plain_step_gradient(km, step, old_ids[j], n)
            assert float(ref.abs().max()) > 0
            torch.testing.assert_close(got[j, i], ref, rtol=1e-4, atol=1e-5 * float(ref.abs().max()))
    torch.testing.assert_close(value_gradients(km, steps, neurons, old_ids), got.mean(dim=0))
