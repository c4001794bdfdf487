"""The key of the subject at the start of a text (``fit_subject_start``) on tiny GPT-2 and LLaMA models, for
ROME, kn-subject and MEMIT: after an edit whose prompts all have the subject inside, the value projection's
output at that key, read plainly (one forward of the subject alone, no padding), has moved by exactly the
method's residual; without the setting it has not; the keys of prompts without the subject move by a small share
of it; with a tokenizer that adds a BOS token the key is the subject's right after it."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import kn_edit
from kn_edit.editing import EditRequest
from kn_edit.editing.keyvalue import keys as keys_module
from kn_edit.editing.keyvalue.keys import fitted_keys, start_text
from kn_edit.editing.keyvalue.settings import KeyFit
from kn_edit.editing.memit import MemitEditor
from kn_edit.editing.rome import RomeEditor
from kn_edit.editing.subject_neurons import SubjectNeuronEditor
from plain_values import plain_keys, plain_weight
from tiny_models import CORPUS, build_model, causal_tokenizer

FAMILIES = ["gpt2", "llama"]
METHODS = ["rome", "kn-subject", "memit"]
# The subject (two tokens in the tiny tokenizer) is inside every edit prompt: no edit prompt's key is the start key.
REQUEST = EditRequest(prompts=("The capital of France is", "Paris is the capital of France. The capital of France is"),
                      old="Paris", new="Rome", subject="France")
OTHERS = ["The capital of Japan is", "Rome is located in Italy.", "Tokyo is a city in Japan."]  # no "France"
COMMON = dict(n_prefixes=2, prefix_length=3, steps=4, lr=0.5, clamp_norm_factor=1e4, weight_decay=0.0)


def make(method: str, tmp_path, **settings):
    settings = {**COMMON, "cache_dir": str(tmp_path / "cache"), **settings}
    if method == "rome":
        return RomeEditor(key_texts=CORPUS, layer=0, **settings)
    if method == "kn-subject":  # the whole layer: tiny models' few neurons cannot carry several exact keys
        return SubjectNeuronEditor(key_texts=CORPUS, layer=0, neurons=None, cov_ridge=1e-3, max_text_change=None,
                                   widen_above=None, **settings)
    # one layer, no weight on C: the soft solve becomes exact, so the residual is met exactly
    return MemitEditor(key_texts=CORPUS, layers=[0], mom2_update_weight=0.0, refit=None, **settings)


def residual(method: str, km, details, before: np.ndarray) -> np.ndarray:
    """The shift the method asks of the subject's keys: ROME's v* − W k*, kn-subject's and MEMIT's δ."""
    if method == "rome":
        r = details.requests[0]
        bias = km.value_proj(0).bias
        bias = bias.detach().double().numpy() if bias is not None else 0.0
        return r.value.double().numpy() - (before @ r.key.double().numpy() + bias)
    return details.requests[0].delta.double().numpy()


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", METHODS)
def test_the_start_key_moves_by_the_method_s_residual(tiny_factory, tmp_path, monkeypatch, family, method):
    monkeypatch.setattr(keys_module, "START_COST", float("inf"))  # never left out here (its own test is below)
    km = tiny_factory(family)
    before = plain_weight(km, 0)
    start = plain_keys(km, 0, ["France"])[-1]  # the subject alone, its last token's key
    others = np.concatenate([plain_keys(km, 0, [text]) for text in OTHERS])  # every token's key [n, d_ff]
    moved = {}
    for on in (False, True):
        edit = make(method, tmp_path, fit_subject_start=on).apply(km, [REQUEST])
        try:
            delta = residual(method, km, edit.report.details, before)
            update = plain_weight(km, 0) - before
        finally:
            edit.revert()
        moved[on] = (update @ start, delta)
        # prompts without the subject: their outputs move by a small share of δ (a tiny random model's 64 neurons
        # cannot hold them at 0; measured at most 0.23 ‖δ‖ with or without the start key)
        assert np.linalg.norm(others @ update.T, axis=1).max() < 0.3 * np.linalg.norm(delta)
    change, delta = moved[True]
    assert np.abs(delta).max() > 0
    assert np.allclose(change, delta, rtol=1e-3, atol=1e-4 * np.abs(delta).max())
    change_off, delta_off = moved[False]  # without the setting the start key gets another share of δ (1.3-2.5 δ)
    assert not np.allclose(change_off, delta_off, rtol=1e-2, atol=1e-2 * np.abs(delta_off).max())


@pytest.mark.parametrize("family", FAMILIES)
def test_no_start_key_at_the_first_position(tiny_factory, family):
    """A one-token subject on a model without BOS: its start key would be the first position's (the attention
    sink, nearly every text's first key), so none is added; a two-token subject's is."""
    km = tiny_factory(family)
    one = EditRequest(prompts=("The city of Paris is",), old="x", new="y", subject="Paris")  # "Paris": one token
    assert start_text(km, "Paris") is None and start_text(km, "France").position == 1  # "France": two tokens
    for request, added in ((one, 0), (REQUEST, 1)):
        key = torch.zeros(km.d_ff)
        on = fitted_keys(km, 0, key, request.subject, request.prompts, [""], KeyFit.prompts, subject_start=True)
        off = fitted_keys(km, 0, key, request.subject, request.prompts, [""], KeyFit.prompts, subject_start=False)
        assert len(on) == len(off) + added and torch.equal(on[: len(off)], off)
        if added:
            assert np.allclose(on[-1].double().numpy(), plain_keys(km, 0, [request.subject])[-1], atol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_a_start_key_that_costs_too_much_is_left_out(tiny_factory, tmp_path, monkeypatch, family):
    """start_cost: √(wᵀCw) of the exact direction with the start key over without it, written plainly; above
    START_COST the key is left out (the ratio is ≥ 1 always: one more constraint)."""
    km = tiny_factory(family)
    editor = make("rome", tmp_path)
    mom2 = editor.statistics(km, 0).mom2
    on = fitted_keys(km, 0, torch.zeros(km.d_ff) + 0.1, REQUEST.subject, REQUEST.prompts, [""], KeyFit.prompts, True)
    c, k = mom2.double().numpy(), on.double().numpy().T  # K [d_ff, m]

    def size(keys):
        solved = np.linalg.solve(c, keys)
        w = solved @ np.linalg.pinv(keys.T @ solved, hermitian=True) @ np.ones(keys.shape[1])
        return float(np.sqrt(w @ c @ w))

    ratio = keys_module.start_cost(mom2, on)
    assert ratio == pytest.approx(size(k) / size(k[:, :-1]), rel=1e-6) and ratio >= 1
    assert keys_module.start_cost(torch.zeros_like(mom2), on) == float("inf")  # C measures nothing: left out
    for limit, kept in ((ratio * 1.01, len(on)), (ratio * 0.99, len(on) - 1)):
        monkeypatch.setattr(keys_module, "START_COST", limit)
        got = fitted_keys(km, 0, torch.zeros(km.d_ff) + 0.1, REQUEST.subject, REQUEST.prompts, [""], KeyFit.prompts,
                          True, mom2)
        assert len(got) == kept and torch.equal(got, on[:kept])


def test_the_start_key_follows_the_bos_token(tmp_path, monkeypatch):
    monkeypatch.setattr(keys_module, "START_COST", float("inf"))
    """A tokenizer that adds a BOS token: the start key is the subject's right after it (as in every prompt that
    begins with the subject), and the edit maps that key, read plainly, to v*."""
    from tokenizers import Tokenizer
    from tokenizers.processors import TemplateProcessing
    from transformers import PreTrainedTokenizerFast

    raw = Tokenizer.from_str(causal_tokenizer().backend_tokenizer.to_str())
    bos = raw.token_to_id("<|endoftext|>")
    raw.post_processor = TemplateProcessing(single="<|endoftext|> $A", special_tokens=[("<|endoftext|>", bos)])
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, eos_token="<|endoftext|>", bos_token="<|endoftext|>")
    model, _ = build_model("llama")
    km = kn_edit.wrap(model, tok, name="tiny-llama-bos")
    assert start_text(km, "Paris").position == 1  # one token, after BOS: not the first position
    text = start_text(km, "France")
    assert int(text.input_ids[0]) == bos and text.position == len(text.input_ids) - 1 > 0
    before = plain_weight(km, 0)
    start = plain_keys(km, 0, ["France"])[-1]  # plain_keys adds the special tokens: BOS, then the subject
    edit = make("rome", tmp_path, fit_subject_start=True).apply(km, [REQUEST])
    try:
        delta = residual("rome", km, edit.report.details, before)
        change = (plain_weight(km, 0) - before) @ start
    finally:
        edit.revert()
    assert np.allclose(change, delta, rtol=1e-3, atol=1e-4 * np.abs(delta).max())


def test_fit_subject_start_must_be_a_bool_and_is_on_by_default():
    from kn_edit import ConfigError

    with pytest.raises(ConfigError, match="fit_subject_start"):
        RomeEditor(fit_subject_start="yes").settings.check()
    assert RomeEditor().settings.fit_subject_start  # the measured default (configs/methods/rome.yaml)
