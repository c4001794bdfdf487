"""suppress / amplify: exactly the chosen neurons at exactly the answer position, and nothing left behind."""

from __future__ import annotations

import pytest
import torch

from helpers import assert_same, hook_count, snapshot
from kn_edit import KnEditError
from kn_edit.locating.manipulate import amplify, answer_positions, suppress
from kn_edit.models.neurons import Neuron

CAUSAL_FACTS = [("The capital of France is", "Paris"), ("Danielle Darrieux was born in", "Bordeaux"),
                ("Tokyo is", "a city in Japan")]
MASKED_FACTS = [("The capital of France is [MASK].", "paris"), ("rome is located in [MASK].", "italy"),
                ("[MASK] is the capital of germany.", "berlin")]

NEURONS = [Neuron(0, 3), Neuron(0, 17), Neuron(1, 5), Neuron(1, 63)]


def facts_for(km):
    return MASKED_FACTS if km.is_masked_lm else CAUSAL_FACTS


def all_steps(km):
    return [s for p, t in facts_for(km) for s in km.encode(p, t).steps]


def batch_logits(km, steps):
    ids, mask = km.pad([s.input_ids for s in steps])
    with torch.no_grad():
        return km.model(input_ids=ids, attention_mask=mask).logits


class Capture:
    """Value-projection inputs of every layer, before (prepended pre-hook) and after all other hooks."""

    def __init__(self, km):
        self.km, self.before, self.after, self.handles = km, {}, {}, []

    def __enter__(self):
        for l, module in self.km.value_projs().items():
            self.handles.append(module.register_forward_pre_hook(self._pre(l), prepend=True))
            self.handles.append(module.register_forward_hook(self._post(l)))
        return self

    def _pre(self, l):
        def hook(_m, args):
            self.before[l] = args[0].detach().clone()
        return hook

    def _post(self, l):
        def hook(_m, args, _out):
            self.after[l] = args[0].detach().clone()
        return hook

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()


@pytest.mark.parametrize("mode", ["suppress", "amplify"])
def test_only_chosen_neurons_at_answer_position_change(tiny, mode):
    km = tiny
    steps = all_steps(km)
    assert len({len(s.input_ids) for s in steps}) > 1, "rows of different lengths exercise padding"
    ids, mask = km.pad([s.input_ids for s in steps])
    before_hooks = hook_count(km)
    ctx = suppress(km, NEURONS) if mode == "suppress" else amplify(km, NEURONS, factor=2.0)
    with ctx, Capture(km) as cap, torch.no_grad():
        km.model(input_ids=ids, attention_mask=mask)
    assert hook_count(km) == before_hooks
    for l in range(km.n_layers):
        expected = cap.before[l].clone()  # [batch, seq, d_ff]
        for row, step in enumerate(steps):
            for n in NEURONS:
                if n.layer == l:
                    value = expected[row, step.position, n.index]
                    expected[row, step.position, n.index] = 0.0 if mode == "suppress" else 2.0 * value
        assert torch.equal(cap.after[l], expected)
        assert not torch.equal(cap.after[l], cap.before[l])


def test_matches_unbatched_reference(tiny):
    """Batched step_logits under suppress equal one-row forwards with a plain hook zeroing the known position."""
    km = tiny
    steps = all_steps(km)
    with suppress(km, NEURONS):
        batched = km.step_logits(steps)
    for i, step in enumerate(steps):
        handles = []
        for l in {n.layer for n in NEURONS}:
            idx = torch.tensor([n.index for n in NEURONS if n.layer == l])

            def zero(_m, args, idx=idx, pos=step.position):
                act = args[0].clone()
                act[0, pos, idx] = 0.0
                return (act, *args[1:])

            handles.append(km.value_proj(l).register_forward_pre_hook(zero))
        try:
            with torch.no_grad():
                ref = km.model(input_ids=step.input_ids.unsqueeze(0)).logits[0, step.position].float()
        finally:
            for h in handles:
                h.remove()
        torch.testing.assert_close(batched[i], ref, rtol=1e-5, atol=1e-5)


def test_model_unchanged_after_exit_and_exception(tiny):
    km = tiny
    steps = all_steps(km)
    hooks = hook_count(km)
    clean = batch_logits(km, steps)
    weights = snapshot(km)
    with suppress(km, NEURONS):
        changed = batch_logits(km, steps)
    assert not torch.equal(changed, clean)
    assert hook_count(km) == hooks
    assert torch.equal(batch_logits(km, steps), clean)
    with pytest.raises(RuntimeError, match="boom"):
        with amplify(km, NEURONS, factor=3.0):
            batch_logits(km, steps)
            raise RuntimeError("boom")
    assert hook_count(km) == hooks
    assert torch.equal(batch_logits(km, steps), clean)
    assert_same(km, weights)


def test_amplify_by_one_is_identity(tiny_factory):
    km = tiny_factory("llama")
    steps = all_steps(km)
    clean = batch_logits(km, steps)
    with amplify(km, NEURONS, factor=1.0):
        assert torch.equal(batch_logits(km, steps), clean)


def test_answer_positions():
    class Fake:
        is_masked_lm = False
        device = torch.device("cpu")

    right = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]])
    left = torch.tensor([[0, 1, 1, 1], [0, 0, 1, 1]])
    assert answer_positions(Fake(), None, right, 4).tolist() == [2, 3]
    assert answer_positions(Fake(), None, left, 4).tolist() == [3, 3]
    # With a KV cache the mask covers 3 past tokens plus the 1 current one: position 0 of the input.
    assert answer_positions(Fake(), None, right, 1).tolist() == [-1, 0]
    assert answer_positions(Fake(), torch.zeros(2, 5, dtype=torch.long), None, 5).tolist() == [4, 4]


def test_masked_rows_without_mask_are_left_alone(tiny_factory):
    km = tiny_factory("bert")
    with_mask = km.encode(*MASKED_FACTS[0]).steps[0].input_ids
    plain = torch.tensor(km.tokenizer("rome is located in italy.")["input_ids"])
    ids, mask = km.pad([with_mask, plain])
    positions = answer_positions(km, ids, mask, ids.shape[1])
    assert positions.tolist() == [int((with_mask == km.tokenizer.mask_token_id).nonzero()[0]), -1]
    with torch.no_grad():
        clean = km.model(input_ids=ids, attention_mask=mask).logits
        with suppress(km, NEURONS):
            changed = km.model(input_ids=ids, attention_mask=mask).logits
    assert torch.equal(changed[1], clean[1])
    assert not torch.equal(changed[0], clean[0])


def test_bad_neurons(tiny_factory):
    km = tiny_factory("gpt2")
    with pytest.raises(KnEditError, match="does not exist"):
        with suppress(km, [Neuron(km.n_layers, 0)]):
            pass
    with pytest.raises(KnEditError, match="does not exist"):
        with amplify(km, [Neuron(0, km.d_ff)]):
            pass
    with pytest.raises(KnEditError, match="factor"):
        with amplify(km, NEURONS, factor=float("nan")):
            pass
    assert hook_count(km) == 0


def test_value_projection_called_outside_forward(tiny_factory):
    km = tiny_factory("llama")
    with suppress(km, NEURONS):
        with pytest.raises(KnEditError, match="outside a forward pass"):
            km.value_proj(0)(torch.zeros(1, 2, km.d_ff))
    assert hook_count(km) == 0
