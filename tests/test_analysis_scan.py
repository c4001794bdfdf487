"""Top-text scan and the early-stopped forward, against plain references on tiny random models."""

from __future__ import annotations

import random

import pytest
import torch

from kn_edit.analysis.forward import neuron_activations
from kn_edit.analysis.top_text import RunningExtremes, top_texts
from kn_edit.models.neurons import Neuron
from tiny_models import CORPUS


def plain_value_inputs(km, ids: torch.Tensor) -> dict[int, torch.Tensor]:
    """Every layer's value-projection input [batch, seq, d_ff] from a full forward pass (own hooks)."""
    seen, handles = {}, []
    for layer in range(km.n_layers):
        handles.append(km.value_proj(layer).register_forward_pre_hook(
            lambda _m, args, layer=layer: seen.__setitem__(layer, args[0].detach().clone())))
    try:
        with torch.no_grad():
            km.model(input_ids=ids, attention_mask=torch.ones_like(ids))
    finally:
        for h in handles:
            h.remove()
    return seen


def hook_count(km) -> int:
    return sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in km.model.modules())


@pytest.mark.parametrize("family", ["gpt2", "llama", "bert"])
def test_early_stop_gives_the_full_forward_activations(tiny_factory, family):
    km = tiny_factory(family, n_layers=3)
    ids = torch.tensor([km.tokenizer("The capital of France is Paris.")["input_ids"]])
    full = plain_value_inputs(km, ids)
    top_calls = []
    handle = km.value_proj(2).register_forward_pre_hook(lambda *_: top_calls.append(1))
    try:
        early = neuron_activations(km, ids, torch.ones_like(ids), {0: [3, 1], 1: [5]}, stop_early=True)
    finally:
        handle.remove()
    assert top_calls == []  # layer 2 never ran
    assert torch.equal(early[0], full[0][..., [3, 1]]) and torch.equal(early[1], full[1][..., [5]])
    late = neuron_activations(km, ids, torch.ones_like(ids), {0: [3, 1], 1: [5]}, stop_early=False)
    assert torch.equal(late[1], early[1])
    assert hook_count(km) == 0


def brute_force(km, neurons, texts, k):
    """Every text alone (no padding): peak activation and its first position, then one global sort."""
    rows = []
    for i, text in enumerate(texts):
        ids = torch.tensor([km.tokenizer(text)["input_ids"]])
        acts = plain_value_inputs(km, ids)
        rows.append([(float(acts[n.layer][0, :, n.index].max()),
                      int(acts[n.layer][0, :, n.index].tolist().index(float(acts[n.layer][0, :, n.index].max()))), i)
                     for n in neurons])
    out = []
    for j in range(len(neurons)):
        entries = [(r[j][0], r[j][2], r[j][1]) for r in rows]
        top = sorted(entries, key=lambda e: (-e[0], e[1]))[:k]
        bottom = sorted(entries, key=lambda e: (e[0], e[1]))[:k]
        out.append((top, bottom))
    return out


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_streaming_scan_equals_brute_force_ties_included(tiny_factory, family):
    km = tiny_factory(family, n_layers=3)
    # Every sentence three times: exact ties, broken by corpus position.
    texts = CORPUS * 3
    random.Random(0).shuffle(texts)
    neurons = [Neuron(0, 7), Neuron(1, 2), Neuron(1, 40)]
    result = top_texts(km, neurons, texts, k=5, batch_size=1, bucket=4)
    expected = brute_force(km, neurons, texts, 5)
    for got, (top, bottom) in zip(result.per_neuron, expected):
        assert [(h.score, h.text_id, h.position) for h in got.top] == top
        assert [(h.score, h.text_id, h.position) for h in got.bottom] == bottom
        assert all(h.text == texts[h.text_id] for h in got.top + got.bottom)
    # Ties really occurred and were ordered by corpus position.
    scores = [h.score for h in result.per_neuron[0].top]
    assert len(set(scores)) < len(scores)


def test_batched_scan_matches_one_text_at_a_time(tiny_factory):
    km = tiny_factory("llama", n_layers=3)
    neurons = [Neuron(2, 9), Neuron(0, 0)]
    batched = top_texts(km, neurons, CORPUS, k=4, batch_size=5)
    single = top_texts(km, neurons, CORPUS, k=4, batch_size=1)
    for a, b in zip(batched.per_neuron, single.per_neuron):
        assert [h.text_id for h in a.top] == [h.text_id for h in b.top]
        assert [h.text_id for h in a.bottom] == [h.text_id for h in b.bottom]
        assert torch.allclose(torch.tensor([h.score for h in a.top]), torch.tensor([h.score for h in b.top]), atol=1e-5)
    hit = batched.per_neuron[0].top[0]
    assert hit.text[hit.span[0]:hit.span[1]].strip() == hit.token.strip()


def test_running_extremes_equals_sorting_with_ties():
    gen = torch.Generator().manual_seed(0)
    scores = torch.randint(0, 6, (3, 200), generator=gen).float()  # many ties
    ext = RunningExtremes(3, 7)
    for start in range(0, 200, 13):
        ids = torch.arange(start, min(200, start + 13))
        ext.update(scores[:, ids], ids, torch.zeros(3, len(ids), dtype=torch.long))
        assert ext.size() <= 7
    for j in range(3):
        entries = [(float(scores[j, i]), i) for i in range(200)]
        assert list(zip(ext.top[0][j].tolist(), ext.top[1][j].tolist())) == sorted(entries, key=lambda e: (-e[0], e[1]))[:7]
        assert list(zip(ext.bottom[0][j].tolist(), ext.bottom[1][j].tolist())) == sorted(entries)[:7]


def test_memory_stays_bounded_on_a_long_corpus(tiny_factory):
    km = tiny_factory("gpt2", n_layers=2)
    neurons = [Neuron(1, 3), Neuron(0, 4)]
    k = 3
    sizes, held_sizes = [], []

    def long_corpus():  # a generator: the scan never sees the whole corpus at once
        for i in range(600):
            yield f"{CORPUS[i % len(CORPUS)]} Number {i}."

    result = top_texts(km, neurons, long_corpus(), k=k, batch_size=16,
                       on_batch=lambda ext, held: (sizes.append(ext.size()), held_sizes.append(len(held))))
    assert result.n_texts == 600
    assert max(sizes) == k and max(held_sizes) <= 2 * k * len(neurons)
