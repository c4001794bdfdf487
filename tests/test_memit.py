"""MEMIT on tiny GPT-2 and LLaMA models: one layer and one fact is ROME's update; a batch over several layers
against a plain recomputation of every layer's keys, residuals and update; exact targets at λ = 0; reverts bit for
bit (alone, in sequence, as a patch); bad input."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import kn_edit
from helpers import changed, same, snapshot
from kn_edit import ConfigError, EditError
from kn_edit.editing import EditRequest, make_editor
from kn_edit.editing.ledger import ledger_for
from kn_edit.editing.memit import MemitEditor, default_layers, memit_delta
from kn_edit.editing.rome import RomeEditor, key_statistics
from kn_edit.editing.keyvalue.keys import context_prefixes, prompt_text, subject_texts
from kn_edit.editing.keyvalue.target import rewrite_rows
from kn_edit.editing.values import value_location
from plain_values import plain_key, plain_weight, set_weight
from tiny_models import CORPUS

FAMILIES = ["gpt2", "llama"]
FRANCE = EditRequest(prompts=("The capital of France is", "Paris is the capital of France. The capital of France is"),
                     old="Paris", new="Rome", subject="France")
JAPAN = EditRequest(prompts=("The capital of Japan is",), old="Tokyo", new="Berlin", subject="Japan")
ITALY = EditRequest(prompts=("The capital of Italy is",), old="Rome", new="Madrid", subject="Italy")
# Tiny random models have tiny FFN outputs: a loose norm bound lets the target move the answer at all.
# The start key off: these tests check the paper's keys and fit's; tests/test_subject_start.py checks it.
COMMON = dict(n_prefixes=2, prefix_length=3, steps=4, lr=0.5, clamp_norm_factor=1e4, weight_decay=0.0,
              fit_subject_start=False)


def memit(tmp_path, **overrides) -> MemitEditor:
    """MEMIT as in the paper (one solve: ``refit=None``) unless ``overrides`` ask for the refit."""
    return MemitEditor(key_texts=CORPUS, **{**COMMON, "refit": None, "retarget": 0, "cache_dir": str(tmp_path / "cache"),
                                            **overrides})







def plain_hidden(km, layer: int, ids: torch.Tensor, position: int) -> np.ndarray:
    """The residual after block ``layer`` (hidden_states[layer + 1]; not the last block, whose state is normed)."""
    assert layer < km.n_layers - 1
    with torch.no_grad():
        out = km.model(input_ids=ids[None], output_hidden_states=True)
    return out.hidden_states[layer + 1][0, position].double().numpy()


@pytest.mark.parametrize("family", FAMILIES)
def test_one_layer_and_one_fact_is_rome(tiny_factory, tmp_path, family):
    km = tiny_factory(family)
    before = plain_weight(km, 0)
    rome = RomeEditor(key_texts=CORPUS, layer=0, fit="mean", cache_dir=str(tmp_path / "cache"), **COMMON).apply(km, [FRANCE])
    by_rome = plain_weight(km, 0)
    rome.revert()
    edit = memit(tmp_path, layers=[0], mom2_update_weight=0.0).apply(km, [FRANCE])
    by_memit = plain_weight(km, 0)
    scale = np.abs(by_rome - before).max()
    assert scale > 0
    assert np.abs(by_memit - by_rome).max() <= 1e-5 * scale
    details = edit.report.details
    assert details.layers == [0] and len(edit.patches) == 1
    # ROME's v* − W k* is MEMIT's δ (the same objective at the same layer)
    by_rome_request = rome.report.details.requests[0]
    rome_delta = by_rome_request.value.double() - _output(km, before, by_rome_request.key)
    assert torch.allclose(details.requests[0].delta, rome_delta, rtol=1e-4, atol=1e-5 * float(rome_delta.abs().max()))
    edit.revert()
    assert np.array_equal(plain_weight(km, 0), before)


def _output(km, weight: np.ndarray, key: torch.Tensor) -> torch.Tensor:
    """W k (+ bias) with the given W, written plainly."""
    bias = km.value_proj(0).bias
    out = weight @ key.double().numpy() + (bias.detach().double().numpy() if bias is not None else 0.0)
    return torch.from_numpy(out)


@pytest.mark.parametrize("family", FAMILIES)
def test_a_batch_over_several_layers_matches_a_plain_recomputation(tiny_factory, tmp_path, family):
    """Every layer's keys K_l, residuals R_l = (z − h^L) / (L − l + 1) and update ΔW_l = R_l K_lᵀ (λC + K_l K_lᵀ)⁻¹,
    recomputed plainly: one text at a time, with the earlier layers' updates written into the weights by hand."""
    km = tiny_factory(family, n_layers=3)
    layers, lam = [0, 1], 0.5
    requests = [FRANCE, JAPAN, ITALY]
    original = snapshot(km)
    weights = {l: plain_weight(km, l) for l in layers}
    # A ridge keeps tiny models' C (about 100 tokens of keys in 64 dimensions) well conditioned for the plain inverse.
    edit = memit(tmp_path, layers=layers, mom2_update_weight=lam, cov_ridge=0.1).apply(km, requests)
    details = edit.report.details
    changes = {l: plain_weight(km, l) - weights[l] for l in layers}
    assert changed(km, original) == sorted(value_location(km, l)[0] for l in layers)
    assert len(edit.patches) == 2 and all(p.whole for p in edit.report.parameters)
    edit.revert()
    assert same(km, original)

    prefixes = context_prefixes(km, COMMON["n_prefixes"], COMMON["prefix_length"], 5, 0)
    assert prefixes == details.prefixes
    texts = [subject_texts(km, r.subject, [prompt_text(p) for p in r.prompts], prefixes, True) for r in requests]
    rows = [rewrite_rows(km, r.prompts, r.subject, r.new, prefixes) for r in requests]
    # the unedited model's statistics (what the editor keeps for the model; the cache would recompute them for
    # layer 1 once layer 0 is changed below)
    statistics = {l: key_statistics(km, l, CORPUS, cache_dir=tmp_path / "cache").mom2.double().numpy() for l in layers}
    last = layers[-1]
    h0 = np.stack([np.mean([plain_hidden(km, last, row.input_ids, row.subject) for row in rs], axis=0) for rs in rows])
    delta = np.stack([r.delta.numpy() for r in details.requests])
    assert np.allclose(np.stack([r.hidden.numpy() for r in details.requests]), h0, rtol=1e-5, atol=1e-5)
    for j, layer in enumerate(layers):
        keys = np.stack([np.mean([plain_key(km, layer, t.input_ids, t.position) for t in ts], axis=0) for ts in texts])
        h = np.stack([np.mean([plain_hidden(km, last, row.input_ids, row.subject) for row in rs], axis=0) for rs in rows])
        residuals = (delta - (h - h0)) / (len(layers) - j)
        update = details.updates[j]
        assert np.allclose(update.keys.double().numpy(), keys, rtol=1e-4, atol=1e-5 * np.abs(keys).max())
        assert np.allclose(update.residuals.double().numpy(), residuals, rtol=1e-4, atol=1e-4 * np.abs(residuals).max())
        c = statistics[layer] + 0.1 * np.diag(statistics[layer]).mean() * np.eye(len(statistics[layer]))
        k, r = keys.T, residuals.T  # [d_ff, n], [d_model, n]
        expected = r @ k.T @ np.linalg.inv(lam * c + k @ k.T)  # the paper's form, written plainly
        assert np.abs(changes[layer] - expected).max() <= 1e-3 * np.abs(expected).max()
        set_weight(km, layer, weights[layer] + changes[layer])  # the next layer sees this one's update
    for l in layers:
        set_weight(km, l, weights[l])
    assert same(km, original)


@pytest.mark.parametrize("family", FAMILIES)
def test_at_lambda_zero_every_target_is_reached(tiny_factory, tmp_path, family):
    """λ = 0 and keys read in the edit prompts themselves: the last layer adds exactly the residual still missing,
    so after the edit the residual after L, averaged over each request's rows, is its target z = h^L + δ."""
    km = tiny_factory(family, n_layers=3)
    requests = [FRANCE, JAPAN, ITALY]
    edit = memit(tmp_path, layers=[0, 1], mom2_update_weight=0.0, key_text="prompts").apply(km, requests)
    prefixes = edit.report.details.prefixes
    for request, target in zip(requests, edit.report.details.requests):
        rows = rewrite_rows(km, request.prompts, request.subject, request.new, prefixes)
        h = np.mean([plain_hidden(km, 1, row.input_ids, row.subject) for row in rows], axis=0)
        z = target.hidden.numpy() + target.delta.numpy()
        assert np.abs(h - z).max() <= 1e-4 * np.abs(target.delta.numpy()).max()
        assert target.remaining < 1e-4
    edit.revert()


def test_the_solve_form_equals_the_paper_s_form():
    g = torch.Generator().manual_seed(0)
    k, r = torch.randn(12, 3, generator=g, dtype=torch.float64), torch.randn(5, 3, generator=g, dtype=torch.float64)
    a = torch.randn(12, 40, generator=g, dtype=torch.float64)
    c = a @ a.T / 40
    for lam in (0.0, 0.3, 100.0):
        got = memit_delta(r, k, c, lam).numpy()
        kn, rn, cn = k.numpy(), r.numpy(), c.numpy()
        if lam:
            assert np.allclose(got, rn @ kn.T @ np.linalg.inv(lam * cn + kn @ kn.T), atol=1e-9)
        else:  # λ C + K Kᵀ is singular; the limit maps every key exactly to its residual
            assert np.allclose(got @ kn, rn, atol=1e-9)


@pytest.mark.parametrize("family", FAMILIES)
def test_edits_in_sequence_revert_in_any_order_and_reuse_the_statistics(tiny_factory, tmp_path, monkeypatch, family):
    from kn_edit.editing.keyvalue import statistics as covariance

    km = tiny_factory(family, n_layers=3)
    original = snapshot(km)
    ed = memit(tmp_path, layers=[0, 1])
    first = ed.apply(km, [FRANCE])
    after_first = snapshot(km)

    def no_recompute(*args, **kwargs):
        raise AssertionError("recomputed")

    # layer 1's cache digest has changed (layer 0 is edited); the editor keeps the unedited model's statistics
    monkeypatch.setattr(covariance, "compute_statistics", no_recompute)
    second = ed.apply(km, [JAPAN])
    first.revert()
    second.revert()
    assert same(km, original)
    first = ed.apply(km, [FRANCE])
    assert same(km, after_first)
    first.revert()
    assert same(km, original) and ledger_for(km).touched_rows == {}


def test_memit_through_the_registry_and_a_patch(tiny_factory, tmp_path):
    km = tiny_factory("gpt2", n_layers=3)
    original = snapshot(km)
    ed = make_editor("memit", overrides={**COMMON, "layers": [0, 1], "cache_dir": str(tmp_path / "c")}, key_texts=CORPUS)
    assert isinstance(ed, MemitEditor) and ed.settings.layers == [0, 1]
    edit = ed.apply(km, [FRANCE, JAPAN])
    edited = snapshot(km)
    edit.save(tmp_path / "memit.kn-patch")
    edit.revert()
    again = kn_edit.apply_patch(km, tmp_path / "memit.kn-patch")
    assert same(km, edited)
    again.revert()
    assert same(km, original)


def test_default_layers(tiny_factory):
    assert default_layers(tiny_factory("llama")) == [0]
    assert default_layers(tiny_factory("gpt2", n_layers=12)) == [2, 3, 4]


def test_bad_input_leaves_the_model_unchanged(tiny_factory, tmp_path):
    km = tiny_factory("llama", n_layers=3)
    original = snapshot(km)
    conflicting = EditRequest(prompts=("The capital of France is",), old="Paris", new="Berlin", subject="France")
    for method in (memit(tmp_path, layers=[0, 1]), make_editor("kn"), make_editor("rome")):  # every editor
        with pytest.raises(EditError, match="asked for 'Rome' and for 'Berlin' in one batch"):
            method.apply(km, [FRANCE, conflicting])
    with pytest.raises(EditError, match="needs the subject"):
        memit(tmp_path, layers=[0]).apply(km, [EditRequest(prompts=FRANCE.prompts, old="Paris", new="Rome")])
    with pytest.raises(EditError, match="does not occur"):
        memit(tmp_path, layers=[0]).apply(km, [EditRequest(prompts=("Its capital is",), old="Paris", new="Rome", subject="France")])
    with pytest.raises(EditError, match="layer 3 does not exist"):
        memit(tmp_path, layers=[1, 3]).apply(km, [FRANCE])
    with pytest.raises(EditError, match="cannot erase"):
        memit(tmp_path).apply(km, [EditRequest(prompts=FRANCE.prompts, old="Paris", subject="France")])
    with pytest.raises(EditError, match="causal"):
        memit(tmp_path, layers=[0]).apply(tiny_factory("bert"), [EditRequest(prompts=("France is [MASK].",), old="paris",
                                                                            new="rome", subject="France")])
    assert same(km, original)
    for overrides, key in ([("layers=[2,1]"), "ascending"], ["layers=[]", "at least one"], ["mom2_update_weight=-1", "mom2"],
                           ["null_space_threshold=0", "null_space_threshold"], ["null_space_ridge=0", "null_space_ridge"],
                           ["steps=0", "steps"], ["key_text=middle", "key_text"], ["refit=all", "refit"],
                           ["retarget=-1", "retarget"], ["retarget=1.5", "retarget"], ["retarget=true", "retarget"]):
        with pytest.raises(ConfigError, match=key):
            make_editor("memit", overrides=[overrides])


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("fit", ["prompts", "rows"])
def test_fit_gives_every_prompt_key_its_request_s_residual(tiny_factory, tmp_path, family, fit):
    """fit=prompts|rows: each layer's update is solved for the prefix-averaged key and each edit prompt's own keys,
    all with the request's residual; one layer at λ = 0 maps every one of those keys (read plainly) exactly by it."""
    km = tiny_factory(family, n_layers=2)
    requests = [FRANCE, JAPAN]
    before = plain_weight(km, 0)
    edit = memit(tmp_path, layers=[0], mom2_update_weight=0.0, fit=fit).apply(km, requests)
    change = plain_weight(km, 0) - before
    update = edit.report.details.updates[0]
    prefixes = edit.report.details.prefixes if fit == "rows" else [""]
    start = 0
    for request in requests:  # each request's rows: k̄, then its prompts' own keys (all distinct here)
        own = subject_texts(km, request.subject, [prompt_text(p) for p in request.prompts], prefixes, False)
        rows = 1 + len(own)
        residual = update.residuals[start].double().numpy()
        assert torch.equal(update.residuals[start : start + rows], update.residuals[start].expand(rows, -1))
        for k in [plain_key(km, 0, t.input_ids, t.position) for t in own]:
            assert np.allclose(change @ k, residual, rtol=1e-3, atol=1e-4 * np.abs(residual).max())
        start += rows
    assert update.keys.shape[0] == start == update.residuals.shape[0]
    edit.revert()
    assert np.array_equal(plain_weight(km, 0), before)


def test_fit_counts_a_repeated_prompt_key_once(tiny_factory, tmp_path):
    """Two prompts that start with the subject share its bare key: one column, so λ = 0 stays solvable."""
    km = tiny_factory("llama", n_layers=2)
    request = EditRequest(prompts=("France's capital is", "France has its capital in"), old="Paris", new="Rome",
                          subject="France")
    edit = memit(tmp_path, layers=[0], mom2_update_weight=0.0, fit="prompts").apply(km, [request])
    assert edit.report.details.updates[0].keys.shape[0] == 2  # k̄ and the one bare key
    edit.revert()


def test_a_null_space_sequence_decomposes_each_layer_s_statistics_once(tiny_factory, tmp_path, monkeypatch):
    from kn_edit.editing import nullspace

    km = tiny_factory("llama", n_layers=3)
    original = snapshot(km)
    calls: list[int] = []
    plain = nullspace.null_space

    def counted(second_moment, threshold):
        calls.append(int(second_moment.shape[0]))
        return plain(second_moment, threshold)

    monkeypatch.setattr(nullspace, "null_space", counted)
    ed = memit(tmp_path, layers=[0, 1], null_space=True, null_space_threshold=0.5)
    edits = [ed.apply(km, [request]) for request in (FRANCE, JAPAN, ITALY)]
    assert len(calls) == 2  # one eigendecomposition per layer for the whole sequence, not per edit
    for edit in reversed(edits):
        edit.revert()
    assert same(km, original)


def test_refit_solves_the_short_requests_again_with_their_own_keys(tiny_factory, tmp_path):
    """refit=prompts: requests the fit=mean update leaves short (on a tiny random model, all of them) are solved
    again with fit=prompts from the same targets, which is the fit=prompts edit itself."""
    km = tiny_factory("llama", n_layers=3)
    requests = [FRANCE, JAPAN]
    settings = dict(layers=[0, 1])
    plain = memit(tmp_path, fit="mean", **settings).apply(km, requests)
    assert not any(p.success for p in plain.report.prompts)  # the precondition: every request falls short
    plain.revert()
    with_prompts = memit(tmp_path, fit="prompts", **settings).apply(km, requests)
    expected = {l: plain_weight(km, l) for l in (0, 1)}
    with_prompts.revert()
    before = {l: plain_weight(km, l) for l in (0, 1)}
    edit = memit(tmp_path, fit="mean", refit="prompts", **settings).apply(km, requests)
    assert edit.report.details.refitted == [0, 1]
    assert [r.fit for r in edit.report.details.requests] == ["prompts", "prompts"]
    for l in (0, 1):
        assert np.allclose(plain_weight(km, l), expected[l], rtol=1e-6, atol=1e-9)
    refitted = {l: plain_weight(km, l) for l in (0, 1)}
    edit.revert()
    assert all(np.array_equal(plain_weight(km, l), before[l]) for l in (0, 1))
    # the default is this refit: MEMIT's settings left alone (but the re-targeting after it) give the very same edit
    default = MemitEditor(key_texts=CORPUS, **{**COMMON, "cache_dir": str(tmp_path / "cache"), "retarget": 0,
                                               **settings}).apply(km, requests)
    assert default.report.details.refitted == [0, 1] and default.report.details.settings["refit"] == "prompts"
    assert all(np.array_equal(plain_weight(km, l), refitted[l]) for l in (0, 1))
    default.revert()
    assert all(np.array_equal(plain_weight(km, l), before[l]) for l in (0, 1))


@pytest.mark.parametrize("short", [[], [1]])
def test_refit_changes_only_the_short_requests_keys(tiny_factory, tmp_path, monkeypatch, short):
    """With request 1 short, one layer at λ = 0: request 0 keeps its one prefix-averaged key, request 1 gets its
    prompt's own key too, each mapped exactly to its residual; with none short the edit is fit=mean's."""
    km = tiny_factory("llama", n_layers=2)
    requests = [FRANCE, JAPAN]
    settings = dict(layers=[0], mom2_update_weight=0.0)
    plain = memit(tmp_path, fit="mean", **settings).apply(km, requests)
    mean_change = plain_weight(km, 0)
    plain.revert()
    before = plain_weight(km, 0)
    monkeypatch.setattr(MemitEditor, "_short", staticmethod(lambda km, requests, changes: list(short)))
    edit = memit(tmp_path, fit="mean", refit="prompts", **settings).apply(km, requests)
    details = edit.report.details
    assert details.refitted == short
    assert [r.fit for r in details.requests] == ["prompts" if i in short else "mean" for i in range(2)]
    update = details.updates[0]
    if not short:
        assert np.array_equal(plain_weight(km, 0), mean_change)
    else:
        own = subject_texts(km, JAPAN.subject, [prompt_text(p) for p in JAPAN.prompts], [""], False)
        assert update.keys.shape[0] == 1 + 1 + len(own)  # France: k̄; Japan: k̄ and its prompt's own key
        change = plain_weight(km, 0) - before
        residual = update.residuals[1].double().numpy()
        for k in [plain_key(km, 0, t.input_ids, t.position) for t in own]:
            assert np.allclose(change @ k, residual, rtol=1e-3, atol=1e-4 * np.abs(residual).max())
    edit.revert()
    assert np.array_equal(plain_weight(km, 0), before)


def test_retarget_aims_a_short_request_at_a_target_optimised_on_the_edited_model(tiny_factory, tmp_path, monkeypatch):
    """retarget with request 1 (Japan) short after the first solve, one layer at λ = 0: its δ is optimised again
    on the model the first solve edited (z' = h^L there + δ', recomputed here with the plain objective), and the
    final solve maps its key exactly to z' − h^L before the edit; France's target is untouched. With none short
    the edit is the one-solve edit, bit for bit."""
    from kn_edit.editing.keyvalue.target import kl_row, optimise_value
    from kn_edit.editing.memit.hidden import hidden_at_subject

    km = tiny_factory("llama", n_layers=2)
    requests = [FRANCE, JAPAN]
    settings = dict(layers=[0], mom2_update_weight=0.0)
    before = plain_weight(km, 0)
    # Japan's rewrite rows, with the prefixes of the unedited model (the edit's)
    prefixes = context_prefixes(km, COMMON["n_prefixes"], COMMON["prefix_length"])
    rows = rewrite_rows(km, JAPAN.prompts, JAPAN.subject, JAPAN.new, prefixes)
    first = memit(tmp_path, **settings).apply(km, requests)
    one_solve = plain_weight(km, 0)
    # the plain target on the edited model: h^L of Japan's rows now + the δ' its objective finds now
    key = first.report.details.updates[0].keys[1].float()  # Japan's prefix-averaged key on the unedited model
    output = torch.from_numpy(before @ key.double().numpy()).float()
    found = optimise_value(km, 0, rows, kl_row(km, JAPAN.subject), float(output.norm()), lr=COMMON["lr"],
                           steps=COMMON["steps"], stop_loss=0.05, kl_factor=0.0625, weight_decay=0.0,
                           clamp_norm_factor=COMMON["clamp_norm_factor"])
    z = hidden_at_subject(km, 0, rows).mean(dim=0).double() + found.delta.double()
    first.revert()
    assert np.array_equal(plain_weight(km, 0), before)

    calls = []
    monkeypatch.setattr(MemitEditor, "_short", staticmethod(lambda km, requests, changes: calls.append(1) or
                                                            ([1] if len(calls) == 1 else [])))
    edit = memit(tmp_path, retarget=2, **settings).apply(km, requests)
    details = edit.report.details
    assert len(calls) == 2  # the second round found none short and stopped
    assert [r.retargeted for r in details.requests] == [0, 1]
    assert torch.equal(details.requests[0].delta, first.report.details.requests[0].delta)
    # Japan's target is z' in the frame of the unedited model (δ = z' − h^L before the edit) ...
    expected = z - first.report.details.requests[1].hidden
    assert torch.allclose(details.requests[1].delta, expected, rtol=1e-4, atol=1e-5 * float(expected.abs().max()))
    # ... and the final solve maps Japan's key exactly to it (one layer, λ = 0), France's to its unchanged δ
    change = plain_weight(km, 0) - before
    for i, want in ((1, expected), (0, details.requests[0].delta)):
        got = change @ details.updates[0].keys[i].double().numpy()
        assert np.allclose(got, want.numpy(), rtol=1e-3, atol=1e-4 * float(want.abs().max()))
    assert not np.array_equal(plain_weight(km, 0), one_solve)
    edit.revert()
    assert np.array_equal(plain_weight(km, 0), before)

    checks = []
    monkeypatch.setattr(MemitEditor, "_short", staticmethod(lambda km, requests, changes: checks.append(1) or []))
    none_short = memit(tmp_path, retarget=1, **settings).apply(km, requests)
    assert np.array_equal(plain_weight(km, 0), one_solve) and len(checks) == 1
    assert [r.retargeted for r in none_short.report.details.requests] == [0, 0]
    none_short.revert()
    # with the refit, its check serves both: none short, nothing checked again
    refit = memit(tmp_path, retarget=1, fit="mean", refit="prompts", **settings).apply(km, requests)
    assert np.array_equal(plain_weight(km, 0), one_solve) and len(checks) == 2
    refit.revert()
