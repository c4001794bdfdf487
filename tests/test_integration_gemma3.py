"""Gemma 3 270M (optional: Gemma terms). Runs when it is cached or KN_EDIT_TEST_GEMMA=1 asks to provision it."""

from __future__ import annotations

import os

import pytest

import kn_edit
from kn_edit.models.provision import is_cached

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(
        not (is_cached("gemma3-270m") or os.environ.get("KN_EDIT_TEST_GEMMA") == "1"),
        reason="gemma3-270m not cached; set KN_EDIT_TEST_GEMMA=1 to provision it (~250 MB, ~1 min)",
    ),
]


def test_gemma3_loads_adds_bos_and_knows_paris():
    km = kn_edit.load("gemma3-270m", device="cpu")
    assert km.adapter.family == "gemma3" and km.n_layers == 18 and km.d_ff == 2048
    enc = km.encode("The capital of France is", "Paris")
    assert int(enc.steps[0].input_ids[0]) == km.tokenizer.bos_token_id
    assert " Paris" in [p.token for p in km.predict("The capital of France is", top_k=5)]
    assert km.activations(enc.steps).shape == (1, 18, 2048)
