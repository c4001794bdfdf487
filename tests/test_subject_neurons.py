"""kn-subject (knowledge neurons at the subject's last token) and the text-damage guard, on tiny GPT-2 and LLaMA
models: attribution at another position against the plain reference, the least-change solve against a plainly
solved KKT system, the edit's constraints (edited key → target, preserved keys unmoved) recomputed plainly,
reverts bit for bit, the guard's refusal (model unchanged), bad input."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch

import kn_edit
from helpers import changed, same, snapshot
from kn_edit import ConfigError, EditError, Neuron
from kn_edit.locating.attribution import attribute_steps
from kn_edit.editing import EditRequest, make_editor
from kn_edit.editing.guard import text_change
from kn_edit.editing.ledger import ledger_for
from kn_edit.editing.rome import key_statistics
from kn_edit.editing.values import value_location
from kn_edit.editing.subject_neurons import SubjectNeuronEditor, least_change, neuron_counts, subject_positions
from reference_attribution import reference_step
from tiny_models import CORPUS

FAMILIES = ["gpt2", "llama"]
REQUEST = EditRequest(prompts=("The capital of France is", "Paris is the capital of France. The capital of France is"),
                      old="Paris", new="Rome", subject="France")
GUARD = ["The capital of France is Paris.", "Rome is located in Italy."]


def editor(tmp_path, **overrides) -> SubjectNeuronEditor:
    # Tiny random models: tiny FFN outputs need a loose norm bound; their key statistics are ill-conditioned,
    # so a small ridge keeps the solve well posed. Widening is tested on its own (below): off here, so the
    # tests of the solve edit exactly ``neurons`` neurons. The metric is C alone (the subject metric, cov_subjects:
    # tests/test_subject_metric.py).
    settings = dict(layer=0, neurons=8, attribution_steps=3, n_prefixes=2, prefix_length=3, steps=4, lr=0.5,
                    clamp_norm_factor=1e4, weight_decay=0.0, cov_ridge=1e-3, cache_dir=str(tmp_path / "cache"),
                    max_text_change=None, widen_above=None, fit_subject_start=False,  # start key: test_subject_start.py
                    cov_subjects=0.0)
    extras = {"preserve_subjects": overrides.pop("preserve_subjects", ()), "guard_texts": overrides.pop("guard_texts", GUARD)}
    settings.update(overrides)
    return SubjectNeuronEditor(key_texts=CORPUS, **extras, **settings)


def plain_subject_key(km, layer: int, subject: str, prefixes) -> np.ndarray:
    """[d_ff] float64: the value projection's input at the last token of "{prefix}. {subject}" (or the subject
    alone for the empty prefix), one text at a time, averaged over the prefixes."""
    seen = []
    handle = km.value_proj(layer).register_forward_pre_hook(lambda _m, args: seen.append(args[0][0, -1].double().numpy()))
    try:
        with torch.no_grad():
            for prefix in prefixes:
                text = f"{prefix}. {subject}" if prefix else subject
                km.model(input_ids=torch.tensor([km.tokenizer(text, add_special_tokens=True)["input_ids"]]))
    finally:
        handle.remove()
    return np.mean(seen, axis=0)


def layer_output(km, layer: int, key: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return km.value_proj(layer)(torch.from_numpy(key).float()[None])[0].double().numpy()


# ----- attribution at the subject's last token -------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
def test_attribution_at_the_subject_matches_the_plain_reference(tiny_factory, family):
    km = tiny_factory(family)
    steps, positions = subject_positions(km, REQUEST.prompts[1], "France", "Paris")
    got = attribute_steps(km, steps, 4, [0, 1], positions=positions)  # [n_tokens, 2, d_ff]
    for i, (step, at) in enumerate(zip(steps, positions)):
        assert at < step.position
        for j, layer in enumerate([0, 1]):
            want = reference_step(km, step, layer, 4, at=at)
            assert torch.allclose(got[i, j], want, rtol=1e-4, atol=1e-6 * float(want.abs().max()) + 1e-9)
        # the subject's position is not the answer position: the scores differ
        assert not torch.allclose(got[i, 0], reference_step(km, step, 0, 4), atol=1e-9)


def test_attribution_positions_bad_input(tiny_factory):
    km = tiny_factory("llama")
    steps = km.encode("The capital of France is", "Paris").steps
    with pytest.raises(ConfigError, match="positions for"):
        attribute_steps(km, steps, 2, [0], positions=[0, 1, 2])
    with pytest.raises(kn_edit.PromptError, match="not an input position"):
        attribute_steps(km, steps, 2, [0], positions=[steps[0].position + 1])
    with pytest.raises(ConfigError, match="prefix_cache"):
        attribute_steps(km, steps, 2, [0], prefix_cache=True, positions=[0])


# ----- the least-change solve --------------------------------------------------------------------------------
def test_least_change_matches_a_plainly_solved_kkt_system():
    rng = np.random.default_rng(0)
    n, m, d = 7, 3, 5
    x = rng.normal(size=(40, n))
    c = x.T @ x / 40
    keys, targets = rng.normal(size=(m, n)), rng.normal(size=(m, d))
    got = least_change(torch.from_numpy(c), torch.from_numpy(keys), torch.from_numpy(targets)).numpy()  # [d, n]
    # Each output row r: minimise d_r C d_rᵀ subject to keys d_r = t_r; stationarity 2 C d_r + keysᵀ λ = 0.
    kkt = np.block([[2 * c, keys.T], [keys, np.zeros((m, m))]])
    for r in range(d):
        want = np.linalg.solve(kkt, np.concatenate([np.zeros(n), targets[:, r]]))[:n]
        assert np.allclose(got[r], want, atol=1e-9)
    assert np.allclose(got @ keys.T, targets.T, atol=1e-9)
    # any other change meeting the constraints costs more
    null = np.linalg.svd(keys)[2][m:]  # rows spanning {z : keys z = 0}
    cost = lambda dd: np.trace(dd @ c @ dd.T)  # noqa: E731
    for _ in range(5):
        assert cost(got + rng.normal(size=(d, n - m)) @ null) > cost(got)
    with pytest.raises(EditError, match="singular"):  # one key asked for two targets
        least_change(torch.from_numpy(c), torch.from_numpy(np.stack([keys[0], keys[0]])), torch.from_numpy(targets[:2]))
    # one key twice with one target (two prompts that start with the subject): one constraint, same solution
    twice = least_change(torch.from_numpy(c), torch.from_numpy(np.stack([keys[0], keys[0], keys[1]])),
                         torch.from_numpy(np.stack([targets[0], targets[0], targets[1]]))).numpy()
    once = least_change(torch.from_numpy(c), torch.from_numpy(keys[:2]), torch.from_numpy(targets[:2])).numpy()
    assert np.allclose(twice, once, atol=1e-9)


# ----- the edit -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
def test_edit_moves_the_subject_s_key_by_delta_and_the_preserved_keys_by_nothing(tiny_factory, tmp_path, family):
    km = tiny_factory(family)
    before_weight = snapshot(km)
    preserved = ["Japan", "Italy"]
    edit = editor(tmp_path, preserve_subjects=preserved).apply(km, [REQUEST])
    details = edit.report.details
    info = details.requests[0]
    assert len(info.neurons) == 8 and info.preserved == 2
    assert edit.report.neurons == [Neuron(0, i) for i in info.neurons]
    key = plain_subject_key(km, 0, "France", details.prefixes)
    assert np.allclose(key, info.key.double().numpy(), rtol=1e-5, atol=1e-6)
    after = {k: layer_output(km, 0, plain_subject_key(km, 0, k, details.prefixes)) for k in ["France", *preserved]}
    heads = [p[: p.rfind("France") + len("France")] for p in REQUEST.prompts]  # fit=prompts: each prompt's own key
    own = [plain_subject_key(km, 0, head, [""]) for head in heads]
    own_after = [layer_output(km, 0, k) for k in own]
    edit.revert()
    assert same(km, before_weight)
    moved = layer_output(km, 0, key)
    delta = info.delta.double().numpy()
    scale = float(np.abs(delta).max())
    assert np.abs((after["France"] - moved) - delta).max() <= 1e-4 * scale  # edited key → target
    for k, out in zip(own, own_after):  # each edit prompt's own key moves by δ too
        assert np.abs((out - layer_output(km, 0, k)) - delta).max() <= 1e-4 * scale
    for subject in preserved:  # preserved keys' outputs unmoved (to float32 rounding)
        assert np.abs(after[subject] - layer_output(km, 0, plain_subject_key(km, 0, subject, details.prefixes))).max() <= 1e-4 * scale
    # only the chosen neurons' value vectors change
    v0 = km.value_vectors(0).detach().clone()
    edit2 = editor(tmp_path, preserve_subjects=preserved).apply(km, [REQUEST])
    moved = torch.nonzero((km.value_vectors(0).detach() != v0).any(dim=1)).flatten().tolist()
    assert moved and set(moved) <= set(info.neurons)
    edit2.revert()
    assert same(km, before_weight)


@pytest.mark.parametrize("family", FAMILIES)
def test_with_the_whole_layer_the_solve_is_rome_s_rank_one_update(tiny_factory, tmp_path, family):
    km = tiny_factory(family)
    edit = editor(tmp_path, neurons=None, cov_ridge=0.0, fit="mean").apply(km, [REQUEST])
    info = edit.report.details.requests[0]
    after = km.value_vectors(0).detach().double().numpy()  # [d_ff, d_model]
    edit.revert()
    before = km.value_vectors(0).detach().double().numpy()
    c = key_statistics(km, 0, CORPUS, cache_dir=tmp_path / "cache").mom2.double().numpy()
    k, delta = info.key.double().numpy(), info.delta.double().numpy()
    u = np.linalg.solve(c, k)
    expected = before + np.outer(u, delta) / (u @ k)  # value vectors are rows here: (ΔW)ᵀ
    scale = np.abs(expected - before).max()
    assert np.abs(after - expected).max() <= 1e-4 * scale + 1e-7
    assert info.neurons == list(range(km.d_ff))


@pytest.mark.parametrize("family", FAMILIES)
def test_revert_is_bit_for_bit_and_requests_stack(tiny_factory, tmp_path, family):
    km = tiny_factory(family)
    state = snapshot(km)
    other = EditRequest(prompts=("The capital of Japan is",), old="Tokyo", new="Berlin", subject="Japan")
    edit = editor(tmp_path).apply(km, [REQUEST, other])
    assert len(edit.report.details.requests) == 2 and changed(km, state) == [value_location(km, 0)[0]]
    assert not ledger_for(km).active_edits[:-1]
    edit.revert()
    assert same(km, state)


def test_an_exception_inside_compute_leaves_the_model_unchanged(tiny_factory, tmp_path, monkeypatch):
    import kn_edit.editing.subject_neurons as module

    km = tiny_factory("llama")
    state = snapshot(km)
    calls = []

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:  # the second request, after the first one's trial change
            raise RuntimeError("boom")
        return real(*args, **kwargs)

    real = module.least_change
    monkeypatch.setattr(module, "least_change", failing)
    other = EditRequest(prompts=("The capital of Japan is",), old="Tokyo", new="Berlin", subject="Japan")
    with pytest.raises(RuntimeError, match="boom"):
        editor(tmp_path, batch="sequential").apply(km, [REQUEST, other])
    assert same(km, state) and not ledger_for(km).active_edits
    # joint: the second request's v* optimisation fails, after the first one's
    monkeypatch.setattr(module, "least_change", real)
    optimise, calls[:] = module.optimise_value, []

    def failing_value(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("boom")
        return optimise(*args, **kwargs)

    monkeypatch.setattr(module, "optimise_value", failing_value)
    with pytest.raises(RuntimeError, match="boom"):
        editor(tmp_path).apply(km, [REQUEST, other])
    assert same(km, state) and not ledger_for(km).active_edits


# ----- the text-damage guard -----------------------------------------------------------------------------------
def plain_perplexity(km, texts) -> float:
    total, count = 0.0, 0
    with torch.no_grad():
        for t in texts:
            ids = km.tokenizer(t, add_special_tokens=True)["input_ids"][:48]
            logp = torch.log_softmax(km.model(input_ids=torch.tensor([ids])).logits[0, :-1].double(), dim=-1)
            total -= float(logp[torch.arange(len(ids) - 1), torch.tensor(ids[1:])].sum())
            count += len(ids) - 1
    return math.exp(total / count)


@pytest.mark.parametrize("family", FAMILIES)
def test_the_guard_reports_the_perplexity_change_measured_plainly(tiny_factory, tmp_path, family):
    km = tiny_factory(family)
    base = plain_perplexity(km, GUARD)
    edit = editor(tmp_path).apply(km, [REQUEST])
    measured = plain_perplexity(km, GUARD) / base - 1
    assert edit.report.details.text_change == pytest.approx(measured, rel=1e-3, abs=1e-5)
    edit.revert()
    kn = kn_edit.update_fact(km, REQUEST.prompts[:1], "Paris", "Rome", neurons=[Neuron(0, 1), Neuron(1, 2)], force=True,
                             guard_texts=GUARD, max_text_change=None, margin=0.1, on_failure="apply")
    assert kn.report.details.text_change == pytest.approx(plain_perplexity(km, GUARD) / base - 1, rel=1e-3, abs=1e-5)
    kn.revert()


@pytest.mark.parametrize("method", ["kn", "kn-subject"])
def test_the_guard_refuses_an_edit_past_its_limit_and_leaves_the_model_unchanged(tiny_factory, tmp_path, method):
    km = tiny_factory("llama")
    state = snapshot(km)
    # The guard's text states the old fact, so the edit raises its perplexity: a tiny limit is exceeded.
    if method == "kn":
        run = lambda limit: kn_edit.update_fact(  # noqa: E731
            km, REQUEST.prompts[:1], "Paris", "Rome", neurons=[Neuron(1, i) for i in range(16)], force=True,
            guard_texts=["The capital of France is Paris"], max_text_change=limit, margin=5.0,
            max_change=1e3, on_failure="apply")
    else:
        run = lambda limit: SubjectNeuronEditor(  # noqa: E731
            key_texts=CORPUS, guard_texts=["The capital of France is Paris"], layer=0, neurons=8, attribution_steps=2,
            n_prefixes=0, steps=4, clamp_norm_factor=1e4, weight_decay=0.0, cov_ridge=1e-3,
            cache_dir=str(tmp_path / "cache"), max_text_change=limit, widen_above=None).apply(km, [REQUEST])
    edit = run(None)
    change = edit.report.details.text_change
    edit.revert()
    assert change > 0
    with pytest.raises(EditError, match="would change perplexity on the guard's text sample"):
        run(change / 2)
    assert same(km, state) and not ledger_for(km).active_edits
    run(change * 2).revert()  # under the limit: applied
    assert same(km, state)


def test_text_change_reverts_its_trial(tiny_factory):
    km = tiny_factory("gpt2")
    state = snapshot(km)
    from kn_edit.editing.values import value_changes

    neurons = [Neuron(1, i) for i in range(km.d_ff)]
    change = text_change(km, value_changes(km, neurons, torch.randn(km.d_ff, km.d_model), True), GUARD)
    assert abs(change) > 1e-4 and same(km, state)


# ----- widening: more neurons where a few cost general text -----------------------------------------------
def test_neuron_counts_widen_by_the_factor_up_to_the_whole_layer():
    assert neuron_counts(64, 1536, 4, True) == [64, 256, 1024, 1536]
    assert neuron_counts(64, 1536, 4, False) == [64]
    assert neuron_counts(None, 1536, 4, True) == [1536]
    assert neuron_counts(4000, 1536, 4, True) == [1536]
    assert neuron_counts(1, 10, 2, True) == [1, 2, 4, 8, 10]


# The widening tests' guard text states the old fact, so every count's edit raises its perplexity (each moves the
# key of "The capital of France" by δ): a tiny widen_above is met by none.
OLD_FACT = ["The capital of France is Paris"]


def edited_values(km, tmp_path, **overrides) -> tuple[torch.Tensor, object]:
    """Layer 0's value vectors after the edit, and its report (the edit reverted)."""
    edit = editor(tmp_path, guard_texts=OLD_FACT, **overrides).apply(km, [REQUEST])
    values = km.value_vectors(0).detach().clone()
    edit.revert()
    return values, edit.report


@pytest.mark.parametrize("family", FAMILIES)
def test_widening_measures_each_count_plainly_and_keeps_the_one_that_moves_text_least(tiny_factory, tmp_path, family):
    km = tiny_factory(family)
    state = snapshot(km)
    base = plain_perplexity(km, OLD_FACT)
    # Each count edited on its own, without widening: its text change measured plainly.
    plain = {}
    for n in (8, 32, 64):
        edit = editor(tmp_path, neurons=n).apply(km, [REQUEST])
        plain[n] = (plain_perplexity(km, OLD_FACT) / base - 1, km.value_vectors(0).detach().clone())
        edit.revert()
    assert same(km, state)
    # A limit no count meets: every count is tried (8, 32, then the whole layer of 64) and the least change kept.
    values, report = edited_values(km, tmp_path, neurons=8, widen_above=1e-12, max_text_change=None)
    info = report.details.requests[0]
    assert [n for n, _ in info.widening] == [8, 32, 64]
    for n, change in info.widening:
        assert change == pytest.approx(plain[n][0], rel=1e-3, abs=1e-6)
    best = min(info.widening, key=lambda x: x[1])[0]
    assert info.count == best and len(info.neurons) == best
    assert torch.equal(values, plain[best][1])  # the very edit made with that count alone
    assert report.details.text_change == pytest.approx(plain[best][0], rel=1e-3, abs=1e-6)
    # A limit the first count meets: one measurement, the narrow edit bit for bit.
    values, report = edited_values(km, tmp_path, neurons=8, widen_above=1e6)
    assert [n for n, _ in report.details.requests[0].widening] == [8]
    assert torch.equal(values, plain[8][1]) and report.details.requests[0].count == 8
    assert same(km, state)


def test_widening_stops_at_the_first_count_within_the_limit(tiny_factory, tmp_path):
    km = tiny_factory("gpt2")  # on this tiny model each wider count moves the guard's text less (asserted)
    _, report = edited_values(km, tmp_path, neurons=8, widen_above=1e-12)
    changes = dict(report.details.requests[0].widening)
    assert changes[8] > changes[32] > changes[64] > 0
    _, report = edited_values(km, tmp_path, neurons=8, widen_above=(changes[8] + changes[32]) / 2)
    info = report.details.requests[0]
    assert info.widening == [(8, changes[8]), (32, changes[32])] and info.count == 32 and len(info.neurons) == 32


def test_the_guard_refuses_when_no_count_is_within_its_limit(tiny_factory, tmp_path):
    km = tiny_factory("llama")
    state = snapshot(km)
    _, report = edited_values(km, tmp_path, neurons=8, widen_above=1e-12)
    least = min(change for _, change in report.details.requests[0].widening)
    assert least > 0
    with pytest.raises(EditError, match="would change perplexity on the guard's text sample"):
        editor(tmp_path, neurons=8, widen_above=1e-12, max_text_change=least / 2, guard_texts=OLD_FACT).apply(km, [REQUEST])
    assert same(km, state) and not ledger_for(km).active_edits
    editor(tmp_path, neurons=8, widen_above=1e-12, max_text_change=least * 2, guard_texts=OLD_FACT).apply(km, [REQUEST]).revert()
    assert same(km, state)


def test_a_joint_batch_widens_every_request_together(tiny_factory, tmp_path):
    km = tiny_factory("llama")
    state = snapshot(km)
    other = EditRequest(prompts=("The capital of Japan is",), old="Tokyo", new="Berlin", subject="Japan")
    edit = editor(tmp_path, neurons=8, widen_above=1e-12, guard_texts=OLD_FACT).apply(km, [REQUEST, other])
    first, second = edit.report.details.requests
    assert first.widening == second.widening and [n for n, _ in first.widening] == [8, 32, 64]
    assert first.count == second.count == min(first.widening, key=lambda x: x[1])[0]
    assert edit.report.details.text_change == pytest.approx(dict(first.widening)[first.count], rel=1e-9)
    edit.revert()
    assert same(km, state)


# ----- bad input ---------------------------------------------------------------------------------------------
def test_subject_missing_or_not_in_a_prompt_is_a_clear_error(tiny_factory, tmp_path):
    km = tiny_factory("llama")
    state = snapshot(km)
    with pytest.raises(EditError, match="kn-subject needs the subject"):
        editor(tmp_path).apply(km, [EditRequest(prompts=REQUEST.prompts, old="Paris", new="Rome")])
    wrong = EditRequest(prompts=("The capital of France is", "Its capital is"), old="Paris", new="Rome", subject="France")
    with pytest.raises(EditError, match="'France' does not occur in prompt 'Its capital is'"):
        editor(tmp_path).apply(km, [wrong])
    with pytest.raises(EditError, match="empty subject"):
        SubjectNeuronEditor(preserve_subjects=[" "])
    assert same(km, state)


def test_bad_settings(tiny_factory, tmp_path):
    for override, key in (("neurons=0", "neurons"), ("attribution_steps=0", "attribution_steps"),
                          ("widen_above=0", "widen_above"), ("widen_factor=1", "widen_factor"),
                          ("widen_factor=2.5", "widen_factor"),
                          ("max_text_change=0", "max_text_change"), ("clamp_norm_factor=0", "clamp_norm_factor")):
        with pytest.raises(ConfigError, match=key):
            make_editor("kn-subject", overrides=[override])
    with pytest.raises(ConfigError, match="max_text_change"):
        make_editor("kn", overrides=["max_text_change=-1"])
    with pytest.raises(EditError, match="cannot erase"):
        SubjectNeuronEditor().apply(tiny_factory("llama"), [EditRequest(prompts=("The capital of France is",),
                                                                         old="Paris", subject="France")])
    with pytest.raises(EditError, match="causal"):
        editor(tmp_path).apply(tiny_factory("bert"), [EditRequest(prompts=("France is [MASK].",), old="paris",
                                                                  new="rome", subject="France")])


# ----- keep_edits: earlier edits' keys in the metric -------------------------------------------------------
OTHER = EditRequest(prompts=("The capital of Japan is",), old="Tokyo", new="Berlin", subject="Japan")


@pytest.mark.parametrize("family", FAMILIES)
def test_keep_edits_solve_matches_the_plain_solve_with_the_earlier_key_in_the_metric(tiny_factory, tmp_path, family):
    km = tiny_factory(family)
    state = snapshot(km)
    first = editor(tmp_path, fit="mean").apply(km, [REQUEST])
    weight = 3.0
    v0 = km.value_vectors(0).detach().double().numpy().copy()
    second = editor(tmp_path, fit="mean", keep_edits=weight).apply(km, [OTHER])
    v1 = km.value_vectors(0).detach().double().numpy().copy()
    info, earlier = second.report.details.requests[0], first.report.details.requests[0]
    assert info.kept_edits == 1  # the first edit is active: its key is found through the ledger
    s = np.array(info.neurons)
    c = key_statistics(km, 0, CORPUS, cache_dir=tmp_path / "cache").mom2.double().numpy()[np.ix_(s, s)]
    c = c + 1e-3 * np.mean(np.diag(c)) * np.eye(len(s))  # the editor's cov_ridge
    k_e = earlier.key.double().numpy()[s]
    metric = c + weight * np.outer(k_e, k_e)
    k, delta = info.key.double().numpy()[s], info.delta.double().numpy()
    u = np.linalg.solve(metric, k)
    expected = np.outer(u, delta) / (u @ k)  # [|S|, d_model]: the value vectors' change
    scale = np.abs(expected).max()
    assert np.abs((v1 - v0)[s] - expected).max() <= 1e-4 * scale
    second.revert()
    first.revert()
    assert same(km, state)


@pytest.mark.parametrize("family", FAMILIES)
def test_keep_edits_holds_the_layer_output_on_earlier_edits_keys(tiny_factory, tmp_path, family):
    """A second edit, alone or in the same call, moves the layer's output on the first edit's key: less the larger
    keep_edits, and by nothing measurable at a very large weight."""
    km = tiny_factory(family)
    state = snapshot(km)

    def moved_on_first(weight: float, together: bool) -> float:
        if together:
            edit = editor(tmp_path, keep_edits=weight, batch="sequential").apply(km, [REQUEST, OTHER])
            first_key = edit.report.details.requests[0].key.double().numpy()
            assert edit.report.details.requests[1].kept_edits == (1 if weight else 0)
            edit.revert()
            one = editor(tmp_path, keep_edits=weight).apply(km, [REQUEST])
            before = layer_output(km, 0, first_key)
            one.revert()
            edit = editor(tmp_path, keep_edits=weight, batch="sequential").apply(km, [REQUEST, OTHER])
            after = layer_output(km, 0, first_key)
            edit.revert()
        else:
            one = editor(tmp_path).apply(km, [REQUEST])
            first_key = one.report.details.requests[0].key.double().numpy()
            before = layer_output(km, 0, first_key)
            two = editor(tmp_path, keep_edits=weight).apply(km, [OTHER])
            after = layer_output(km, 0, first_key)
            two.revert()
            one.revert()
        assert same(km, state)
        return float(np.abs(after - before).max())

    for together in (False, True):
        free, some, strong = (moved_on_first(w, together) for w in (0.0, 1.0, 1e8))
        assert free > 0 and some < free and strong <= 1e-3 * free


def test_keep_edits_bad_values(tmp_path):
    for bad in (-1.0, float("nan"), True, "x"):
        with pytest.raises(ConfigError, match="keep_edits"):
            editor(tmp_path, keep_edits=bad)


# ----- batch=joint: one solve for several requests ---------------------------------------------------------
THIRD = EditRequest(prompts=("The capital of Spain is", "Spain has its capital in"), old="Madrid", new="Paris",
                    subject="Spain")


@pytest.mark.parametrize("family", FAMILIES)
def test_joint_batch_moves_every_request_s_keys_by_its_own_delta_and_the_preserved_by_nothing(tiny_factory, tmp_path,
                                                                                               family):
    km = tiny_factory(family)
    state = snapshot(km)
    requests = [REQUEST, OTHER, THIRD]
    preserved = ["Italy"]
    v0 = km.value_vectors(0).detach().clone()
    edit = editor(tmp_path, preserve_subjects=preserved).apply(km, requests)
    details = edit.report.details
    union = sorted({i for r in details.requests for i in r.neurons})
    assert sorted(n.index for n in edit.report.neurons) == union
    # every request's δ was found on the unedited model: the same as its single edit's
    keys = {r.subject: plain_subject_key(km, 0, r.subject, details.prefixes) for r in requests}
    after = {x: layer_output(km, 0, k) for x, k in keys.items()}
    italy = plain_subject_key(km, 0, "Italy", details.prefixes)
    italy_after = layer_output(km, 0, italy)
    heads = {r.subject: [plain_subject_key(km, 0, p[: p.rfind(r.subject) + len(r.subject)], [""]) for p in r.prompts]
             for r in requests}  # fit=prompts: each prompt's own key is moved by δ too
    heads_after = {x: [layer_output(km, 0, k) for k in ks] for x, ks in heads.items()}
    moved = torch.nonzero((km.value_vectors(0).detach() != v0).any(dim=1)).flatten().tolist()
    assert set(moved) <= set(union)
    edit.revert()
    assert same(km, state)
    for info in details.requests:
        single = editor(tmp_path).apply(km, [next(r for r in requests if r.subject == info.subject)])
        assert torch.allclose(single.report.details.requests[0].delta, info.delta, atol=1e-6)
        single.revert()
        delta = info.delta.double().numpy()
        scale = float(np.abs(delta).max())
        assert np.abs((after[info.subject] - layer_output(km, 0, keys[info.subject])) - delta).max() <= 1e-4 * scale
        for k, out in zip(heads[info.subject], heads_after[info.subject]):
            assert np.abs((out - layer_output(km, 0, k)) - delta).max() <= 1e-4 * scale
    scale = max(float(r.delta.abs().max()) for r in details.requests)
    assert np.abs(italy_after - layer_output(km, 0, italy)).max() <= 1e-4 * scale
    assert same(km, state)


LANGUAGE = EditRequest(prompts=("The official language of France is",), old="French", new="Italian",
                       subject="France")  # REQUEST's subject, another relation


@pytest.mark.parametrize("family", FAMILIES)
def test_joint_batch_gives_one_subject_s_facts_one_delta_over_all_their_rows(tiny_factory, tmp_path, family,
                                                                              monkeypatch):
    """Two facts of one subject share its key, so the joint solve gives them one δ, optimised over both facts'
    rewrite rows (each row with its own new object): recomputed here by optimising over those rows directly."""
    from kn_edit.editing import subject_neurons
    from kn_edit.editing.keyvalue.target import kl_row, rewrite_rows

    km = tiny_factory(family)
    state = snapshot(km)
    calls = []
    real = subject_neurons.optimise_value
    monkeypatch.setattr(subject_neurons, "optimise_value", lambda *a, **k: calls.append(len(a[2])) or real(*a, **k))
    ed = editor(tmp_path)
    edit = ed.apply(km, [REQUEST, OTHER, LANGUAGE])
    details = edit.report.details
    france = [r for r in details.requests if r.subject == "France"]
    assert len(france) == 2 and torch.equal(france[0].delta, france[1].delta)
    assert torch.equal(france[0].key, france[1].key)  # key_text=subject: one key
    assert len(calls) == 2  # one δ for France (both facts' rows), one for Japan
    after = layer_output(km, 0, plain_subject_key(km, 0, "France", details.prefixes))
    edit.revert()
    assert same(km, state)
    s = ed.settings
    prefixes = details.prefixes
    rows = (rewrite_rows(km, REQUEST.prompts, "France", "Rome", prefixes)
            + rewrite_rows(km, LANGUAGE.prompts, "France", "Italian", prefixes))
    assert calls[0] == len(rows)
    key = torch.from_numpy(plain_subject_key(km, 0, "France", prefixes)).float()
    norm = float(torch.from_numpy(layer_output(km, 0, key.double().numpy())).norm())
    plain = real(km, 0, rows, kl_row(km, "France"), norm, lr=s.lr, steps=s.steps, stop_loss=s.stop_loss,
                 kl_factor=s.kl_factor, weight_decay=s.weight_decay, clamp_norm_factor=s.clamp_norm_factor)
    delta = plain.delta.double()
    assert torch.allclose(france[0].delta.double(), delta, atol=1e-5 * float(delta.abs().max()))
    moved = after - layer_output(km, 0, plain_subject_key(km, 0, "France", prefixes))  # the shared key moved by that δ
    assert np.abs(moved - france[0].delta.double().numpy()).max() <= 1e-4 * float(delta.abs().max())
    assert same(km, state)


def test_one_fact_asked_for_two_objects_is_a_clear_error(tiny_factory, tmp_path):
    km = tiny_factory("llama")
    state = snapshot(km)
    capital = dataclasses.replace(REQUEST, relation="P36")
    twice = EditRequest(prompts=("The capital city of France is",), old="Paris", new="Tokyo", subject="France",
                        relation="P36")
    with pytest.raises(EditError, match="'France' \\(P36\\) is asked for 'Rome' and for 'Tokyo'"):
        editor(tmp_path).apply(km, [capital, twice])  # one fact, two objects (the editors' common check)
    assert same(km, state)
    with pytest.raises(EditError, match="asked for 'Rome' and for 'Tokyo'"):  # one prompt, two objects
        editor(tmp_path).apply(km, [REQUEST, dataclasses.replace(twice, prompts=REQUEST.prompts, relation=None)])
    assert same(km, state)


def test_batch_setting_is_checked(tmp_path):
    with pytest.raises(ConfigError, match="batch"):
        editor(tmp_path, batch="together")
