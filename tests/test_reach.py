"""kn_edit.analysis.reach: the share of an edit's δ at every token of other prompts, against a plain recomputation
(the weight change times each token's key), and ‖δ‖ itself where the prompt holds the edit's own key."""

from __future__ import annotations

import numpy as np
import pytest

from kn_edit import EditError
from kn_edit.analysis.reach import edit_reach
from kn_edit.editing import EditRequest, make_editor
from kn_edit.editing.keyvalue.keys import token_at
from plain_values import plain_keys, plain_weight
from tiny_models import CORPUS

REQUEST = EditRequest(prompts=("The capital of France is",), old="Paris", new="Rome", subject="France")
PROMPTS = ["France is a country in", "The Eiffel Tower is in", "Japan and France are"]


def test_shares_are_the_weight_change_on_each_token_s_key(tiny_factory, tmp_path):
    km = tiny_factory("llama")
    # no prefixes, fit mean: k* is the key of "France" alone after BOS, the key "France is a country in" starts with
    editor = make_editor("rome", overrides=dict(layer=0, n_prefixes=0, steps=3, lr=0.5, clamp_norm_factor=1e4,
                                                weight_decay=0.0, fit="mean", fit_subject_start=False,
                                                cache_dir=str(tmp_path / "c")), key_texts=CORPUS)
    before = plain_weight(km, 0)
    edit, reach = edit_reach(km, editor, REQUEST, PROMPTS)
    change = plain_weight(km, 0) - before
    delta = edit.report.details.requests[0].delta_norm
    edit.revert()
    for prompt, r in zip(PROMPTS, reach):
        keys = plain_keys(km, 0, [prompt])  # [tokens, d_ff], the unedited model's (the edited layer's input)
        plain = np.linalg.norm(keys @ change.T, axis=1) / delta
        assert len(r.shares) == len(plain) == len(r.tokens)
        assert np.allclose(r.shares, plain, rtol=1e-4, atol=1e-6)
        assert r.flipped == (r.before != r.after)
    first = reach[0]
    at = token_at(km.tokenizer, PROMPTS[0], len("France"))[1]  # the last token of "France", after BOS
    assert abs(first.shares[at] - 1.0) < 1e-3  # the edit's own key moves by exactly δ
    assert first.strongest(1)[0][0] == at


def test_a_method_of_several_layers_is_refused(tiny_factory):
    km = tiny_factory("llama")
    with pytest.raises(EditError, match="one layer"):
        edit_reach(km, make_editor("memit", overrides={"layers": [0, 1]}), REQUEST, PROMPTS)
