"""Top-text scan and the early-stopped forward, against plain references on tiny random models."""

from __future__ import annotations

import random

import pytest
import torch

from helpers import hook_count
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


# ----- reading and cutting long text -----------------------------------------------------------------------------
_END = __import__("re").compile(r"(?<=[.!?])\s+(?=[\"'(\[A-Z0-9])")


def _reference_paragraphs(path) -> list[str]:
    """The plain reading: lines stripped, joined by a space within a paragraph (up to a blank line)."""
    out, lines = [], []
    for line in open(path, encoding="utf-8"):
        if line.strip():
            lines.append(line.strip())
        elif lines:
            out.append(" ".join(lines))
            lines = []
    return out + ([" ".join(lines)] if lines else [])


def _reference_sentences(text: str) -> list[str]:
    return [s.strip() for s in _END.split(" ".join(text.split())) if s.strip()]


def test_streamed_corpus_reads_as_the_whole_text_would(tmp_path, monkeypatch):
    """Read a few characters at a time (lines and sentences cut across reads), the texts, sentences, limits and
    character cuts are those of reading each paragraph whole."""
    from kn_edit.analysis import corpus

    monkeypatch.setattr(corpus, "_CHUNK", 3)
    rng = random.Random(0)
    alphabet = ["ab", "Z", "7", ".", "!", "?", " ", "   ", "\t", "\n", "\n\n", " \n ", "'", "(", "\u00a0", "é"]
    path = tmp_path / "c.txt"
    for _ in range(400):
        path.write_text("".join(rng.choice(alphabet) for _ in range(rng.randint(0, 60))), encoding="utf-8")
        paragraphs = _reference_paragraphs(path)
        sentences = [s for p in paragraphs for s in _reference_sentences(p)]
        assert list(corpus.file_texts(path)) == paragraphs
        assert corpus.split_sentences(path.read_text(encoding="utf-8")) == _reference_sentences(path.read_text(encoding="utf-8"))
        if not paragraphs:
            continue
        assert list(corpus.corpus_texts(str(path), sentences=False)) == paragraphs
        if sentences:
            assert list(corpus.corpus_texts(str(path))) == sentences
        for cap in (1, 4):
            assert list(corpus.corpus_texts(str(path), sentences=False, max_chars=cap)) == [p[:cap] for p in paragraphs]
            if sentences:
                assert list(corpus.corpus_texts(str(path), max_chars=cap)) == [s[:cap] for s in sentences]
        first = [s for p in paragraphs[:1] for s in _reference_sentences(p)]
        if first:
            assert list(corpus.corpus_texts(str(path), limit=1)) == first


@pytest.mark.parametrize("family", ["llama", "bert"])
def test_the_character_cut_never_changes_a_scan(tiny_factory, monkeypatch, family):
    """Texts far longer than max_tokens tokens scan exactly as when tokenized whole: the same scores, peaks,
    tokens and spans (for WordPiece also a 100 kB unknown word, one token, where the cut head falls back)."""
    import kn_edit.models.prompts as prompts

    km = tiny_factory(family, n_layers=2)
    neurons = [Neuron(1, 3), Neuron(0, 5)]
    texts = list(CORPUS) + [" ".join(CORPUS) * 30, "Paris " * 2000, ("x" * 100_000 + " " + CORPUS[0]).lower()]
    assert any(prompts.text_head(km.tokenizer, t, 8) is not t for t in texts)
    cut = top_texts(km, neurons, texts, k=len(texts), batch_size=4, max_tokens=8)
    monkeypatch.setattr(prompts, "head_chars", lambda tokenizer, n: None)  # no cut: every text tokenized whole
    whole = top_texts(km, neurons, texts, k=len(texts), batch_size=4, max_tokens=8)
    for a, b in zip(cut.per_neuron, whole.per_neuron):
        assert [(h.text_id, h.score, h.position, h.token, h.span) for h in a.top + a.bottom] == \
               [(h.text_id, h.score, h.position, h.token, h.span) for h in b.top + b.bottom]  # fmt: skip
    assert cut.n_tokens == whole.n_tokens
