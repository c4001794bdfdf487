"""The subject metric (``cov_subjects``): C + β·C_subjects, C_subjects the second moment of other subjects' keys.
Its values against a plain recomputation, its cache, the update it gives (ROME's closed form in that metric), that
it moves a named subject's key less, and bad settings."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kn_edit import ConfigError, DataError
from kn_edit.editing import EditRequest, make_editor
from kn_edit.editing.keyvalue import statistics as statistics_module
from kn_edit.editing.keyvalue.keys import context_prefixes, token_at, with_prefix
from kn_edit.editing.keyvalue.nearest import MAX_SHARE, MIN_SHARE, nearest_subjects, overlaps, swapped
from kn_edit.editing.keyvalue.statistics import key_statistics, statistics_for, subject_statistics
from kn_edit.editing.rome import RomeEditor
from kn_edit.data.text import text_file_names
from plain_values import plain_key, plain_weight
from tiny_models import CORPUS

REQUEST = EditRequest(prompts=("The capital of France is",), old="Paris", new="Rome", subject="France")
NAMES = ["Japan", "Tokyo Tower", "Germany", "the Eiffel Tower", "Italy"]


def names_file(tmp_path, names=NAMES):
    path = tmp_path / "names.txt"
    path.write_text("\n".join(["", *names, "   "]) + "\n", encoding="utf-8")
    return str(path)


def rome(tmp_path, **overrides) -> RomeEditor:
    settings = dict(layer=0, n_prefixes=2, prefix_length=3, steps=4, lr=0.5, clamp_norm_factor=1e4, weight_decay=0.0,
                    cache_dir=str(tmp_path / "cache"), fit_subject_start=False, fit="mean",
                    cov_subject_names=names_file(tmp_path))
    settings.update(overrides)
    return RomeEditor(key_texts=CORPUS, **settings)


def plain_name_key_rows(km, layer, name, prefixes) -> np.ndarray:
    """[len(prefixes), d_ff]: the key at the name's last token after each prefix, one text at a time, no padding."""
    rows = []
    for prefix in prefixes:
        text = with_prefix(prefix, name)
        ids, pos = token_at(km.tokenizer, text, len(text))
        rows.append(plain_key(km, layer, torch.tensor(ids), pos))
    return np.stack(rows)


def plain_subject_moment(km, layer, names, prefixes) -> np.ndarray:
    """E[k kᵀ] over each name's last token after each prefix."""
    keys = np.concatenate([plain_name_key_rows(km, layer, n, prefixes) for n in names])
    return keys.T @ keys / len(keys)


def plain_name_keys(km, layer, names, prefixes) -> np.ndarray:
    """[len(names), d_ff]: each name's key averaged over the prefixes (as k* is)."""
    return np.stack([plain_name_key_rows(km, layer, n, prefixes).mean(axis=0) for n in names])


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_subject_moment_matches_a_plain_recomputation_and_is_cached(tiny_factory, tmp_path, family):
    km = tiny_factory(family)
    prefixes = context_prefixes(km, 2, 3)
    found = subject_statistics(km, 0, names_file(tmp_path), 4, prefixes, cache_dir=tmp_path / "cache")
    got = found.moment
    expected = plain_subject_moment(km, 0, NAMES[:4], prefixes)
    assert np.allclose(got.double().numpy(), expected, rtol=1e-4, atol=1e-6 * np.abs(expected).max())
    assert found.names == tuple(NAMES[:4])
    means = plain_name_keys(km, 0, NAMES[:4], prefixes)
    assert np.allclose(found.keys.double().numpy(), means, rtol=1e-4, atol=1e-6 * np.abs(means).max())
    files = list((tmp_path / "cache").rglob("*subjects*.safetensors"))
    assert len(files) == 1
    # A new model object (nothing held in memory) reads the file: the same tensor bit for bit.
    km.model.__dict__.pop("_kn_edit_key_statistics")
    again = subject_statistics(km, 0, names_file(tmp_path), 4, prefixes, cache_dir=tmp_path / "cache")
    assert torch.equal(again.moment, got) and torch.equal(again.keys, found.keys) and again.names == found.names
    # Other prefixes are other statistics (they are sampled from the whole model, which the file name's
    # weights digest does not cover).
    other = subject_statistics(km, 0, names_file(tmp_path), 4, [""], cache_dir=tmp_path / "cache")
    assert not torch.equal(other.moment, got)
    assert len(list((tmp_path / "cache").rglob("*subjects*.safetensors"))) == 2


def test_statistics_for_adds_the_weighed_subject_moment(tiny_factory, tmp_path):
    km = tiny_factory("llama")
    plain = rome(tmp_path).settings
    weighed = rome(tmp_path, cov_subjects=2.5).settings
    c = statistics_for(km, 0, plain, CORPUS).mom2
    m = statistics_for(km, 0, weighed, CORPUS)
    prefixes = context_prefixes(km, 2, 3)
    subjects = plain_subject_moment(km, 0, NAMES, prefixes)
    expected = c.double().numpy() + 2.5 * subjects
    assert np.allclose(m.mom2.double().numpy(), expected, rtol=1e-4, atol=1e-6 * np.abs(expected).max())
    # held: the same sum (and its factorizations) for every later edit
    assert statistics_for(km, 0, weighed, CORPUS).memo is m.memo
    assert statistics_for(km, 0, plain, CORPUS).mom2 is not m.mom2


def test_rome_update_is_the_least_change_in_the_subject_metric(tiny_factory, tmp_path):
    km = tiny_factory("llama")
    before = plain_weight(km, 0)
    editor = rome(tmp_path, cov_subjects=3.0)
    edit = editor.apply(km, [REQUEST])
    details = edit.report.details.requests[0]
    after = plain_weight(km, 0)
    edit.revert()
    assert np.array_equal(plain_weight(km, 0), before)
    # The metric as the editor used it, on the unedited model (its prefixes are sampled from the model, so the edited
    # one has others). Its values are checked against a plain computation above; tiny models' C is ill-conditioned,
    # so one summed in another order would move the update far more than rounding.
    m = statistics_for(km, 0, editor.settings, CORPUS)
    assert m.from_cache
    c = key_statistics(km, 0, CORPUS, cache_dir=tmp_path / "cache").mom2
    assert not torch.equal(m.mom2, c)
    m = m.mom2.double().numpy()
    k = details.key.double().numpy()
    delta = details.value.double().numpy() - before @ k
    u = np.linalg.solve(m, k)
    expected = before + np.outer(delta, u) / (u @ k)
    scale = np.abs(expected - before).max()
    assert np.abs(after - expected).max() <= 1e-4 * scale + 1e-6


@pytest.mark.parametrize("method", ["rome", "kn-subject"])
def test_a_named_subject_moves_less_under_the_subject_metric(tiny_factory, tmp_path, method):
    """The update's change on a subject the metric names (here the only one, in the edit's key texts), relative to
    the shift it gives k*, shrinks as β grows (Sherman–Morrison: strictly, for one rank-one term)."""
    km = tiny_factory("llama")
    neighbour = "Japan"
    text = neighbour  # n_prefixes=0: the name alone, the text its metric term is taken at
    ids, pos = token_at(km.tokenizer, text, len(text))
    k_other = torch.from_numpy(plain_key(km, 0, torch.tensor(ids), pos))
    before = plain_weight(km, 0)
    shares = []
    for beta in (0.0, 1.0, 10.0):
        settings = dict(layer=0, n_prefixes=0, steps=3, lr=0.5, clamp_norm_factor=1e4, weight_decay=0.0, fit="mean",
                        fit_subject_start=False, cache_dir=str(tmp_path / "cache"), cov_subjects=beta,
                        cov_subject_names=names_file(tmp_path, [neighbour]))
        if method == "kn-subject":
            settings.update(neurons=None, widen_above=None, max_text_change=None, cov_ridge=1e-3, attribution_steps=2)
        editor = make_editor(method, overrides=settings, key_texts=CORPUS)
        edit = editor.apply(km, [REQUEST])
        key = edit.report.details.requests[0].key.double()
        change = torch.from_numpy(plain_weight(km, 0) - before)
        shares.append(float((change @ k_other.double()).norm() / (change @ key).norm()))
        edit.revert()
    assert shares[0] > shares[1] > shares[2]
    assert shares[2] < 0.5 * shares[0]


def test_names_file_and_bad_settings_are_clear_errors(tiny_factory, tmp_path):
    assert text_file_names(names_file(tmp_path)) == NAMES
    with pytest.raises(DataError, match="names file not found"):
        text_file_names(tmp_path / "missing.txt")
    (tmp_path / "empty.txt").write_text("\n \n", encoding="utf-8")
    with pytest.raises(DataError, match="no names"):
        text_file_names(tmp_path / "empty.txt")
    for bad in (dict(cov_subjects=-1.0), dict(cov_subjects=float("nan")), dict(cov_subject_count=0),
                dict(cov_subject_names="  ")):
        with pytest.raises(ConfigError):
            make_editor("rome", overrides=bad)
    km = tiny_factory("llama")
    editor = rome(tmp_path, cov_subjects=1.0, cov_subject_names=str(tmp_path / "missing.txt"))
    with pytest.raises(DataError, match="names file not found"):
        editor.apply(km, [REQUEST])
    assert statistics_module.subject_names(names_file(tmp_path), 2) == NAMES[:2]


NEAR_NAMES = ["Japan", "Tokyo Tower", "Germany", "the Eiffel Tower", "Italy", "France", "Paris France", "Spain",
              "Rome", "Berlin"]


def near_settings(tmp_path, **overrides) -> dict:
    """kn-subject on a tiny model (loose norm bound, a small ridge, no widening or guard) over NEAR_NAMES."""
    settings = dict(layer=0, attribution_steps=2, prefix_length=3, steps=3, lr=0.5, clamp_norm_factor=1e4,
                    weight_decay=0.0, cov_ridge=1e-3, cache_dir=str(tmp_path / "cache"), max_text_change=None,
                    widen_above=None, cov_subject_names=names_file(tmp_path, NEAR_NAMES),
                    cov_subject_count=len(NEAR_NAMES))
    return {**settings, **overrides}


def test_nearest_subjects_are_the_largest_shares_written_plainly(tiny_factory, tmp_path):
    km = tiny_factory("llama")
    prefixes = context_prefixes(km, 2, 3)
    found = subject_statistics(km, 0, names_file(tmp_path, NEAR_NAMES), len(NEAR_NAMES), prefixes,
                               cache_dir=tmp_path / "cache")
    c = key_statistics(km, 0, CORPUS, cache_dir=tmp_path / "cache").mom2
    near = nearest_subjects(km, 0, "France", prefixes, found, c, 3, ridge=1e-3)
    # plainly: w = C'⁻¹k*/(k*ᵀC'⁻¹k*) with C' = C + ridge·mean(diag C)·I; share_j = wᵀk_j
    cr = c.double().numpy() + 1e-3 * np.diag(c.double().numpy()).mean() * np.eye(km.d_ff)
    k = plain_name_key_rows(km, 0, "France", prefixes).mean(axis=0)
    u = np.linalg.solve(cr, k)
    w = u / (u @ k)
    keys = plain_name_keys(km, 0, NEAR_NAMES, prefixes)
    share = keys @ w
    allowed = [i for i, n in enumerate(NEAR_NAMES)
               if n not in ("France", "Paris France") and MIN_SHARE <= share[i] < MAX_SHARE]
    expected = sorted(allowed, key=lambda i: -share[i])[:3]
    assert near.names == tuple(NEAR_NAMES[i] for i in expected)
    assert np.allclose(near.shares, share[expected], rtol=1e-3, atol=1e-6)
    assert "France" not in near.names and "Paris France" not in near.names  # the subject, and a name holding it
    assert overlaps("apple", "Apple Inc.") and overlaps("Apple Inc.", "APPLE") and not overlaps("Japan", "Spain")


def test_kn_subject_holds_the_nearest_names_still(tiny_factory, tmp_path):
    km = tiny_factory("llama")
    before = plain_weight(km, 0).T  # value vectors as rows [d_ff, d_model]
    settings = near_settings(tmp_path, neurons=16, n_prefixes=2, fit_subject_start=False, fit="mean",
                             preserve_nearest=3)
    edit = make_editor("kn-subject", overrides=settings, key_texts=CORPUS).apply(km, [REQUEST])
    details = edit.report.details
    after = plain_weight(km, 0).T
    change = after - before
    held = details.held_names
    assert 1 <= len(held) <= 3 and "France" not in held
    assert details.requests[0].preserved == len(held)
    edit.revert()
    prefixes = context_prefixes(km, 2, 3)  # the unedited model's, which the edit used
    keys = plain_name_keys(km, 0, held, prefixes)
    k = details.requests[0].key.double().numpy()
    moved = np.abs(keys @ change).max()  # D k_j for each held name: nothing (within rounding)
    assert moved <= 1e-5 * np.abs(k @ change).max()
    # ... while k* gets its shift, and without preserve_nearest the same names would have moved
    free = make_editor("kn-subject", overrides={**settings, "preserve_nearest": 0}, key_texts=CORPUS).apply(km, [REQUEST])
    free_change = plain_weight(km, 0).T - before
    free.revert()
    assert np.abs(keys @ free_change).max() > 100 * moved
    assert free.report.details.held_names == []
    for bad in (-1, True, 1.5):
        with pytest.raises(ConfigError):
            make_editor("kn-subject", overrides={"preserve_nearest": bad})


def test_held_names_are_also_held_in_the_edit_prompts_and_at_the_start(tiny_factory, tmp_path):
    """With fit=prompts and the start key, the edit also moves keys of other subjects in the edit prompt's context and
    at a text's start: the held names' keys there (written plainly) are held still too."""
    assert swapped("The capital of France is", "France", "Japan") == "The capital of Japan"
    assert swapped("France, whose capital is [Y].", "France", "the Eiffel Tower") == "the Eiffel Tower"
    km = tiny_factory("llama")
    before = plain_weight(km, 0).T
    settings = near_settings(tmp_path, neurons=24, n_prefixes=1, fit_subject_start=True, fit="prompts",
                             preserve_nearest=2)
    edit = make_editor("kn-subject", overrides=settings, key_texts=CORPUS).apply(km, [REQUEST])
    change = plain_weight(km, 0).T - before
    details = edit.report.details
    edit.revert()
    held = details.held_names
    assert held
    texts = [f"The capital of {name}" for name in held] + list(held)  # in the edit prompt; alone at the start
    keys = []
    for text in texts:
        ids, pos = token_at(km.tokenizer, text, len(text))
        keys.append(plain_key(km, 0, torch.tensor(ids), pos))
    k = details.requests[0].key.double().numpy()
    assert np.abs(np.stack(keys) @ change).max() <= 1e-5 * np.abs(k @ change).max()
    assert details.requests[0].preserved == 3 * len(held)  # with the prefixes, in the prompt, at the start
