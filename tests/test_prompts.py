"""The prompt/answer convention and KnModel's probabilities, checked against plain forward passes."""

from __future__ import annotations

import pytest
import torch

import kn_edit
from kn_edit.models.prompts import causal_prompt, join_target


def test_space_is_inserted_once():
    assert join_target("The capital of France is", "Paris") == ("The capital of France is", " Paris")
    assert join_target("The capital of France is", " Paris") == ("The capital of France is", " Paris")
    assert join_target("The capital of France is ", "Paris") == ("The capital of France is", " Paris")


def test_paris_and_space_paris_mean_the_same(tiny_factory):
    km = tiny_factory("gpt2")
    a = km.encode("The capital of France is", "Paris")
    b = km.encode("The capital of France is", " Paris")
    c = km.encode("The capital of France is ", "Paris")
    assert a.target_ids == b.target_ids == c.target_ids
    assert torch.equal(a.steps[0].input_ids, b.steps[0].input_ids)


def test_pattern_slot_at_the_end_is_cut_and_elsewhere_rejected():
    assert causal_prompt("[X] is the capital of [Y].") == "[X] is the capital of "
    with pytest.raises(kn_edit.PromptError, match="answer slot"):
        causal_prompt("[Y] is the capital of France.")


def test_multi_token_target_is_teacher_forced(tiny_factory):
    km = tiny_factory("llama")
    enc = km.encode("The capital of France is", "Paris, France")
    assert len(enc.target_ids) > 1
    full = enc.steps[-1].input_ids
    for j, step in enumerate(enc.steps):
        assert step.target_id == enc.target_ids[j]
        assert step.position == len(step.input_ids) - 1
        assert torch.equal(step.input_ids, full[: len(step.input_ids)])
    # prob is the product of the teacher-forced token probabilities, from one plain forward pass.
    with torch.no_grad():
        ids = torch.tensor(list(enc.steps[0].input_ids) + list(enc.target_ids))[None]
        logp = torch.log_softmax(km.model(ids).logits[0], dim=-1)
    start = enc.steps[0].position
    expected = sum(float(logp[start + j, t]) for j, t in enumerate(enc.target_ids))
    assert km.log_prob("The capital of France is", "Paris, France") == pytest.approx(expected, abs=1e-5)


def test_masked_prompt_slots(tiny_factory):
    km = tiny_factory("bert")
    a = km.encode("The capital of France is [MASK].", "paris")
    b = km.encode("The capital of France is [Y].", "paris")
    assert torch.equal(a.steps[0].input_ids, b.steps[0].input_ids)
    assert a.steps[0].input_ids[a.steps[0].position] == km.tokenizer.mask_token_id
    with pytest.raises(kn_edit.PromptError, match="exactly one answer slot"):
        km.encode("The capital of France is Paris.", "paris")
    with pytest.raises(kn_edit.PromptError, match="exactly one answer slot"):
        km.predict("no slot here")


def test_masked_multi_token_teacher_forcing(tiny_factory):
    km = tiny_factory("bert")
    enc = km.encode("[MASK] is the capital.", "danielle darrieux")
    assert len(enc.steps) == len(enc.target_ids) > 1
    for j, step in enumerate(enc.steps):
        ids = step.input_ids.tolist()
        assert ids[step.position] == km.tokenizer.mask_token_id
        assert ids[step.position - j : step.position] == list(enc.target_ids[:j])


@pytest.mark.parametrize("prompt,target,error", [
    ("", "Paris", kn_edit.PromptError),
    ("   ", "Paris", kn_edit.PromptError),
    ("The capital of France is", "", kn_edit.TargetError),
    ("The capital of France is", "  ", kn_edit.TargetError),
])
def test_empty_prompt_or_target_is_a_clear_error(tiny_factory, prompt, target, error):
    km = tiny_factory("gpt2")
    with pytest.raises(error):
        km.encode(prompt, target)


def test_unknown_token_target_is_rejected(tiny_factory):
    km = tiny_factory("bert")
    with pytest.raises(kn_edit.TargetError, match="cannot express"):
        km.encode("The capital of France is [MASK].", "日本")


def test_predict_and_prob_agree_with_a_plain_forward(tiny):
    prompt, target = ("The capital of France is [MASK].", "paris") if tiny.is_masked_lm else ("The capital of France is", "Paris")
    step = tiny.encode(prompt, target).steps[0]
    with torch.no_grad():
        probs = torch.softmax(tiny.model(step.input_ids[None]).logits[0, step.position], dim=-1)
    assert tiny.prob(prompt, target) == pytest.approx(float(probs[step.target_id]), rel=1e-5)
    top = tiny.predict(prompt, top_k=3)
    assert [p.token_id for p in top] == probs.topk(3).indices.tolist()
    assert top[0].prob == pytest.approx(float(probs.max()), rel=1e-5)


def test_batched_right_padding_gives_the_same_logits(tiny):
    prompts = (["The [MASK] of France is Paris.", "[MASK] is in Japan."] if tiny.is_masked_lm
               else ["The capital of France is", "Tokyo is a city in"])
    steps = [tiny.encode(p, "paris" if tiny.is_masked_lm else "Paris").steps[0] for p in prompts]
    batched = tiny.step_logits(steps)
    for i, step in enumerate(steps):
        single = tiny.step_logits([step])[0]
        torch.testing.assert_close(batched[i], single, rtol=1e-4, atol=1e-5)


# ----- cutting by characters before tokenizing ---------------------------------------------------------------------
def _random_texts(rng, tokenizer, n_tokens: int) -> list[str]:
    """Texts around the character bound: words of the corpus, the longest vocabulary string repeated (the most
    characters n tokens can span), runs of spaces, and for WordPiece long unknown words (one token however long)."""
    from kn_edit.models.prompts import _longest_token, head_chars
    from tiny_models import CORPUS

    longest = max(tokenizer.get_vocab(), key=len)
    piece = tokenizer.convert_tokens_to_string([longest])
    bound = head_chars(tokenizer, n_tokens)
    words = " ".join(CORPUS).split() + ["", " ", "   ", piece, "#" * 40, "@" * (bound + 5)]
    texts = [piece * (n_tokens - 2), piece * n_tokens, "x" * (bound + 1), " " * (3 * bound) + "Paris"]
    for _ in range(40):
        size = rng.choice([1, 5, n_tokens, 3 * n_tokens, 10 * n_tokens])
        texts.append(" ".join(rng.choice(words) for _ in range(size)))
    assert _longest_token(tokenizer) == len(longest)
    return texts


@pytest.mark.parametrize("masked", [False, True])
def test_the_character_cut_never_changes_the_first_tokens(masked):
    """encode_heads gives exactly tokenize-whole-then-cut (ids and offsets), for texts that fit and texts far
    longer than the bound alike; a byte-level BPE text that fits is never even cut."""
    import random

    from kn_edit.models.prompts import encode_heads, text_head
    from tiny_models import causal_tokenizer, masked_tokenizer

    tok = masked_tokenizer() if masked else causal_tokenizer()
    rng = random.Random(0)
    for n in (4, 16, 64):
        texts = _random_texts(rng, tok, n)
        got = encode_heads(tok, texts, n, add_special_tokens=True, return_offsets_mapping=True)
        for i, text in enumerate(texts):
            whole = tok(text, add_special_tokens=True, return_offsets_mapping=True)
            assert got["input_ids"][i] == whole["input_ids"][:n], (n, text[:80])
            assert [tuple(o) for o in got["offset_mapping"][i]] == [tuple(o) for o in whole["offset_mapping"][:n]]
            if not masked and len(whole["input_ids"]) <= n:  # (WordPiece drops spaces: exact by the fallback)
                assert text_head(tok, text, n) is text  # a text that fits is never cut
    assert encode_heads(tok, [], 4) == {"input_ids": []}


def test_a_pasted_document_is_refused_from_its_head(tiny_factory):
    """A 10 MB prompt is refused as quickly as a short one, with the same one-line error; prompts at the limit,
    and a long unknown word that is one WordPiece token, still pass."""
    import time

    from kn_edit.models.prompts import DEFAULT_MAX_TOKENS, token_limit

    km = tiny_factory("llama")
    document = "The capital of France is " * 400_000  # 10 MB
    start = time.perf_counter()
    with pytest.raises(kn_edit.PromptError, match=r"^prompt 'The capital of France is The capital.*' is over \d+ "
                       rf"tokens long, above the limit of {DEFAULT_MAX_TOKENS}; raise the limit with --max-tokens N"):
        km.encode(document, "Paris")
    with pytest.raises(kn_edit.TargetError, match=r"^target .* is over \d+ tokens long"):
        km.encode("The capital of France is", " Paris" * 2_000_000)
    with pytest.raises(kn_edit.PromptError, match="is over"):
        km.predict(document)
    assert time.perf_counter() - start < 5  # tokenizing the whole document took 14 s and 1.5 GB
    prompt = "The capital of France is"
    n = len(km.encode(prompt, "Paris").steps[0].input_ids)
    with token_limit(n):
        km.encode(prompt, "Paris")
    bert = tiny_factory("bert")
    bert.encode("x" * 100_000 + " the capital of france is [MASK].", "paris")  # 9 tokens in 100 kB: fits
