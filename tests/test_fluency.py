"""Generation fluency: n-gram entropy against a hand computation, greedy generation against a plain argmax loop."""

from __future__ import annotations

import math

import pytest
import torch

from kn_edit import ConfigError, UnsupportedArchitectureError
from kn_edit.evaluation.fluency import greedy_generations, ngram_entropy, ngram_entropy_one, text_entropy, words


def test_entropy_by_hand():
    # "a b a b a": bigrams ab, ba, ab, ba -> {ab: 2, ba: 2}: H2 = 1 bit;
    # trigrams aba, bab, aba -> {aba: 2/3, bab: 1/3}: H3 = -(2/3 log2 2/3 + 1/3 log2 1/3)
    tokens = ["a", "b", "a", "b", "a"]
    h2 = 1.0
    h3 = -(2 / 3 * math.log2(2 / 3) + 1 / 3 * math.log2(1 / 3))
    assert ngram_entropy_one(tokens, 2) == pytest.approx(h2)
    assert ngram_entropy_one(tokens, 3) == pytest.approx(h3)
    # ROME's weights 2/3 and 4/3: (2/3 H2 + 4/3 H3) / 2
    assert text_entropy(tokens) == pytest.approx((2 / 3 * h2 + 4 / 3 * h3) / 2)
    # four distinct bigrams and three distinct trigrams: log2 4 and log2 3
    assert text_entropy("The cat sat down.") == pytest.approx((2 / 3 * 2.0 + 4 / 3 * math.log2(3)) / 2)
    assert words("The cat sat down.") == ["The", "cat", "sat", "down", "."]
    # the mean over texts; a text shorter than n has no n-grams (entropy 0)
    assert ngram_entropy([tokens, "The cat sat down.", "a"]) == pytest.approx(
        (text_entropy(tokens) + text_entropy("The cat sat down.") + 0.0) / 3)
    assert ngram_entropy([[1, 1, 1, 1, 1]]) == 0.0  # pure repetition
    assert ngram_entropy(["a b"], ns=(1,), weights=(1.0,)) == pytest.approx(1.0)


def test_repetition_lowers_entropy():
    fluent = "Paris is the capital of France and home to the Louvre, a museum with many famous paintings."
    repeated = "Paris Paris Paris Paris Paris Paris Paris Paris Paris Paris Paris Paris Paris Paris Paris."
    assert ngram_entropy([repeated]) < 1.0 < ngram_entropy([fluent])


def test_entropy_bad_arguments():
    with pytest.raises(ConfigError):
        ngram_entropy([])
    with pytest.raises(ConfigError):
        text_entropy("a b c", ns=(2, 3), weights=(1.0,))


def plain_greedy(km, prompt: str, max_new_tokens: int) -> list[int]:
    """Argmax one token at a time, the whole sequence recomputed each step, no padding, no cache."""
    ids = torch.tensor(km.tokenizer(prompt)["input_ids"])
    out = []
    with torch.no_grad():
        for _ in range(max_new_tokens):
            nxt = int(km.model(input_ids=ids[None]).logits[0, -1].argmax())
            if nxt == km.tokenizer.eos_token_id:
                break
            out.append(nxt)
            ids = torch.cat([ids, torch.tensor([nxt])])
    return out


@pytest.mark.parametrize("family", ["gpt2", "llama", "gemma3", "gpt_neox"])
def test_batched_generation_equals_plain_loop(tiny_factory, family):
    km = tiny_factory(family)
    km.model.double()  # tiny random models have near-ties; float64 keeps batched and plain argmax apart from noise
    prompts = ["Paris", "The capital of France is", "Tokyo is a city in Japan and", "Rome"]  # different lengths
    got = greedy_generations(km, prompts, max_new_tokens=8, batch_size=3)
    assert [g.prompt for g in got] == prompts
    for g in got:
        assert list(g.token_ids) == plain_greedy(km, g.prompt, 8)
        assert g.continuation == km.tokenizer.decode(list(g.token_ids))
        assert g.text == g.prompt + g.continuation


def test_generation_stops_at_eos(tiny_factory):
    """With a token the model generates declared the end-of-text token, each row stops right before it while
    the other rows of the batch go on."""
    import copy

    km = tiny_factory("llama")
    km.model.double()
    prompts = ["Paris", "The capital of France is", "Rome"]
    free = greedy_generations(km, prompts, max_new_tokens=8, stop_at_eos=False)
    stop = free[0].token_ids[2]
    km.tokenizer = copy.deepcopy(km.tokenizer)  # the tiny tokenizer is shared between tests
    km.tokenizer.eos_token = km.tokenizer.convert_ids_to_tokens(stop)
    assert km.tokenizer.eos_token_id == stop
    stopped = greedy_generations(km, prompts, max_new_tokens=8)
    for f, g in zip(free, stopped):
        cut = list(f.token_ids).index(stop) if stop in f.token_ids else len(f.token_ids)
        assert list(g.token_ids) == list(f.token_ids)[:cut] == plain_greedy(km, f.prompt, 8)
    assert len(stopped[0].token_ids) <= 2


def test_generation_errors(tiny_factory):
    with pytest.raises(UnsupportedArchitectureError, match="causal"):
        greedy_generations(tiny_factory("bert"), ["Paris"], 5)
    with pytest.raises(ConfigError, match="max_new_tokens"):
        greedy_generations(tiny_factory("gpt2"), ["Paris"], 0)
