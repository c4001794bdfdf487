"""Causal tracing against a plainly written reference (one restored position at a time, batch of one)."""

from __future__ import annotations

import pytest
import torch

from kn_edit.models.adapters import first_submodule, get_submodule
from kn_edit.analysis.located import LocatedFact
from kn_edit.analysis.tracing import trace
from kn_edit.analysis.where import trace_fact, where
from kn_edit.errors import PromptError, UnsupportedArchitectureError
from kn_edit.models.neurons import Neuron

ATTN = {"gpt2": "attn", "llama": "self_attn", "gpt_neox": "attention"}


def modules(km, kind):
    blocks = first_submodule(km.model, km.adapter.layers)
    if kind == "hidden":
        return list(blocks)
    return [get_submodule(b, "mlp" if kind == "mlp" else ATTN[km.adapter.family]) for b in blocks]


def reference(km, ids, subject, target_id, noise, kinds, window=1):
    """Plain loop: clean outputs, then for each kind, layer, position and noise sample one forward pass."""
    first = lambda o: o[0] if isinstance(o, tuple) else o  # noqa: E731
    emb = first_submodule(km.model, km.adapter.embeddings)
    s0, s1 = subject
    L, T = km.n_layers, len(ids)

    def prob(noise_row=None, restore=None):
        handles = []
        if noise_row is not None:
            def corrupt(_m, _a, out):
                out = out.clone()
                out[0, s0:s1] = out[0, s0:s1] + noise_row
                return out
            handles.append(emb.register_forward_hook(corrupt))
        if restore is not None:
            kind, layers, pos, clean = restore
            for l in layers:
                def put(_m, _a, out, l=l):
                    value = first(out).clone()
                    value[0, pos] = clean[l][pos]
                    return (value, *out[1:]) if isinstance(out, tuple) else value
                handles.append(modules(km, kind)[l].register_forward_hook(put))
        try:
            with torch.no_grad():
                logits = km.model(input_ids=ids[None]).logits
        finally:
            for h in handles:
                h.remove()
        return float(torch.softmax(logits[0, -1], dim=-1)[target_id])

    clean = {}
    for kind in kinds:
        saved, handles = {}, []
        for l, m in enumerate(modules(km, kind)):
            handles.append(m.register_forward_hook(lambda _m, _a, out, l=l: saved.__setitem__(l, first(out)[0].clone())))
        with torch.no_grad():
            km.model(input_ids=ids[None])
        for h in handles:
            h.remove()
        clean[kind] = saved
    corrupted = sum(prob(noise[s]) for s in range(len(noise))) / len(noise)
    out = {}
    for kind in kinds:
        grid = torch.zeros(L, T)
        for l in range(L):
            # The paper's window: [l - w//2, l - w//2 + w), clipped to the model.
            layers = range(max(0, l - window // 2), min(L, l - window // 2 + window))
            for t in range(T):
                grid[l, t] = sum(prob(noise[s], (kind, layers, t, clean[kind])) for s in range(len(noise))) / len(noise) - corrupted
        out[kind] = grid
    return out, corrupted


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_batched_trace_equals_plain_reference(tiny_factory, family):
    km = tiny_factory(family, n_layers=3)
    noise = torch.randn(2, 1, km.d_model, generator=torch.Generator().manual_seed(1)) * 2.0
    got = trace(km, "The capital of France is", "France", "Paris", noise=noise, batch_rows=7)
    step = km.encode("The capital of France is", "Paris").steps[0]
    assert got.subject_positions == (3, 4) and got.tokens[3] == " France"
    expected, corrupted = reference(km, step.input_ids, (3, 4), step.target_id, noise, ("hidden", "mlp", "attn"))
    assert got.corrupted_prob == pytest.approx(corrupted, abs=1e-7)
    for kind in ("hidden", "mlp", "attn"):
        assert torch.allclose(got.effects[kind], expected[kind], atol=1e-6), kind
    # Restoring the hidden state of the last layer at the last token gives back the clean probability.
    assert got.effects["hidden"][-1, -1] == pytest.approx(got.clean_prob - got.corrupted_prob, abs=1e-6)


def test_window_and_positions(tiny_factory):
    km = tiny_factory("llama", n_layers=4)
    noise = torch.randn(2, 1, km.d_model, generator=torch.Generator().manual_seed(2))
    got = trace(km, "The capital of France is", "France", "Paris", kinds=("mlp",), noise=noise, window=3, positions=[3, 4])
    step = km.encode("The capital of France is", "Paris").steps[0]
    expected, _ = reference(km, step.input_ids, (3, 4), step.target_id, noise, ("mlp",), window=3)
    assert torch.allclose(got.effects["mlp"][:, 3:], expected["mlp"][:, 3:], atol=1e-6)
    assert torch.isnan(got.effects["mlp"][:, :3]).all()
    # Hidden states are restored one layer at a time whatever the window (as in the paper).
    h3 = trace(km, "The capital of France is", "France", "Paris", kinds=("hidden",), noise=noise, window=3)
    h1 = trace(km, "The capital of France is", "France", "Paris", kinds=("hidden",), noise=noise, window=1)
    assert torch.equal(h3.effects["hidden"], h1.effects["hidden"])


def test_seeded_noise_is_reproducible_and_scaled(tiny_factory):
    km = tiny_factory("gpt2")
    a = trace(km, "The capital of France is", "France", "Paris", kinds=("mlp",), samples=2, seed=5)
    b = trace(km, "The capital of France is", "France", "Paris", kinds=("mlp",), samples=2, seed=5)
    assert torch.equal(a.effects["mlp"], b.effects["mlp"])
    weight = km.model.transformer.wte.weight.detach().double()
    assert a.noise_std == pytest.approx(float(weight.std(unbiased=False)), rel=1e-6)


def test_trace_errors(tiny_factory):
    km = tiny_factory("llama")
    with pytest.raises(PromptError, match="not in the prompt"):
        trace(km, "The capital of France is", "Germany", "Paris", samples=1)
    with pytest.raises(UnsupportedArchitectureError, match="masked LM"):
        trace(tiny_factory("bert"), "The capital of France is [MASK].", "France", "paris", samples=1)


def test_where_loop_equals_direct_tracing(tiny_factory):
    km = tiny_factory("llama", n_layers=3)
    facts = [
        LocatedFact("f1", "capital", "France", "Paris", ("The capital of France is",), (Neuron(1, 3), Neuron(2, 4))),
        LocatedFact("f2", "capital", "Italy", "Rome", ("Rome is the capital of", "The capital of Italy is"), (Neuron(0, 1),)),
        LocatedFact("f3", "birth", "Bordeaux", "Paris", ("Danielle Darrieux was born in",), ()),
    ]
    result = where(km, facts, samples=2, accelerator="cpu")
    assert [f.fact_id for f in result.facts] == ["f1", "f2"] and result.skipped[0]["fact_id"] == "f3"
    direct = trace_fact(km, facts[1], 2, 3.0, 0, 1)
    assert direct.prompt == "The capital of Italy is"
    assert result.facts[1].mlp_effect == pytest.approx(direct.mlp_effect, abs=1e-7)
    assert result.facts[1].peak_layer == max(range(3), key=lambda l: direct.mlp_effect[l])
    summary = result.per_relation()["capital"]
    assert summary["kn_mean_layer"] == pytest.approx((1.5 + 0.0) / 2)
    assert summary["kn_layer_share"] == pytest.approx([0.5, 0.25, 0.25])
