"""ROME on tiny GPT-2 and LLaMA models: the closed form against a plain recomputation, the key statistics and
their cache, reverts (alone, stacked with a knowledge-neuron edit, after an exception), and bad input."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import kn_edit
from helpers import changed, hook_count, same, snapshot
from kn_edit import ConfigError, EditError, Neuron
from kn_edit.editing import EditRequest, make_editor
from kn_edit.editing.ledger import ledger_for
from kn_edit.editing.rome import RomeEditor, default_layer, key_statistics
from kn_edit.editing.keyvalue import statistics as covariance_module
from kn_edit.editing.keyvalue import target as values_module
from kn_edit.editing.keyvalue.keys import subject_texts, token_at
from kn_edit.editing.values import value_location
from plain_values import plain_keys, plain_weight
from tiny_models import CORPUS

FAMILIES = ["gpt2", "llama"]
REQUEST = EditRequest(prompts=("The capital of France is", "Paris is the capital of France. The capital of France is"),
                      old="Paris", new="Rome", subject="France")
OTHER = EditRequest(prompts=("The capital of Japan is",), old="Tokyo", new="Berlin", subject="Japan")


def editor(tmp_path, **overrides) -> RomeEditor:
    # Tiny random models have tiny FFN outputs: a loose norm bound lets v* move the answer at all.
    # The start key off: these tests check the paper's keys and fit's; tests/test_subject_start.py checks it.
    settings = dict(layer=0, n_prefixes=2, prefix_length=3, steps=4, lr=0.5, clamp_norm_factor=1e4, weight_decay=0.0,
                    cache_dir=str(tmp_path / "cache"), fit_subject_start=False)
    settings.update(overrides)
    return RomeEditor(key_texts=CORPUS, **settings)






@pytest.mark.parametrize("family", FAMILIES)
def test_update_maps_the_key_to_the_value(tiny_factory, tmp_path, family):
    km = tiny_factory(family)
    edit = editor(tmp_path).apply(km, [REQUEST])
    details = edit.report.details.requests[0]
    key, value = details.key.double().numpy(), details.value.double().numpy()
    bias = km.value_proj(0).bias
    bias = bias.detach().double().numpy() if bias is not None else 0.0
    mapped = plain_weight(km, 0) @ key + bias  # W' k* (+ b), written plainly
    assert np.allclose(mapped, value, rtol=1e-4, atol=1e-5 * np.abs(value).max())
    # ... and the layer itself does the same
    assert torch.allclose(km.value_proj(0)(details.key[None])[0].double(), torch.from_numpy(value), rtol=1e-4,
                          atol=1e-5 * float(np.abs(value).max()))
    edit.revert()


@pytest.mark.parametrize("family", FAMILIES)
def test_rank_one_formula_matches_a_plain_recomputation(tiny_factory, tmp_path, family):
    km = tiny_factory(family)
    before = plain_weight(km, 0)
    edit = editor(tmp_path, fit="mean").apply(km, [REQUEST])
    details = edit.report.details.requests[0]
    # C as the editor used it (its values are checked against a plain computation below; tiny models' C is
    # ill-conditioned, so a C recomputed in another summation order would move the update by ~1e-3).
    stats = key_statistics(km, 0, CORPUS, cache_dir=tmp_path / "cache")
    assert stats.from_cache
    c = stats.mom2.double().numpy()
    k = details.key.double().numpy()
    w_k = before @ k
    delta = details.value.double().numpy() - (w_k + (km.value_proj(0).bias.detach().double().numpy()
                                                     if km.value_proj(0).bias is not None else 0.0))
    u = np.linalg.solve(c, k)
    expected = before + np.outer(delta, u) / (u @ k)
    after = plain_weight(km, 0)
    scale = np.abs(expected - before).max()
    assert np.abs(after - expected).max() <= 1e-4 * scale + 1e-6
    assert edit.report.details.covariance_tokens == stats.n_tokens
    edit.revert()


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("fit", ["prompts", "rows"])
def test_every_fitted_key_gets_the_whole_shift(tiny_factory, tmp_path, family, fit):
    """fit=prompts|rows: ΔW = δ wᵀ with w = C⁻¹K (KᵀC⁻¹K)⁻¹ 1 over k* and the edit's own keys, written plainly;
    every one of those keys is moved by exactly δ."""
    km = tiny_factory(family)
    before = plain_weight(km, 0)
    edit = editor(tmp_path, fit=fit).apply(km, [REQUEST])
    report = edit.report.details
    details = report.requests[0]
    c = key_statistics(km, 0, CORPUS, cache_dir=tmp_path / "cache").mom2.double().numpy()
    bias = km.value_proj(0).bias
    bias = bias.detach().double().numpy() if bias is not None else 0.0
    k_star = details.key.double().numpy()
    delta = details.value.double().numpy() - (before @ k_star + bias)
    heads = [p[: p.rfind("France") + len("France")] for p in REQUEST.prompts]
    prefixes = report.prefixes if fit == "rows" else [""]
    texts = [f"{prefix}. {head}" if prefix else head for head in heads for prefix in prefixes]
    own = [plain_keys(km, 0, [text])[-1] for text in texts]  # the subject's last token ends each text
    keys = np.stack([k_star] + own, axis=1)  # K [d_ff, m]
    solved = np.linalg.solve(c, keys)
    w = solved @ np.linalg.pinv(keys.T @ solved, hermitian=True) @ np.ones(keys.shape[1])
    expected = before + np.outer(delta, w)
    after = plain_weight(km, 0)
    scale = np.abs(expected - before).max()
    assert scale > 0
    assert np.abs(after - expected).max() <= 1e-4 * scale + 1e-6
    for k in keys.T:  # each key gets the whole δ
        assert np.allclose((after - before) @ k, delta, rtol=1e-3, atol=1e-4 * np.abs(delta).max())
    edit.revert()


@pytest.mark.parametrize("family", FAMILIES)
def test_key_statistics_match_plain_and_are_read_back_from_the_cache(tiny_factory, tmp_path, monkeypatch, family):
    km = tiny_factory(family)
    first = key_statistics(km, 1, CORPUS, cache_dir=tmp_path, batch_size=5)
    keys = plain_keys(km, 1, CORPUS)
    assert not first.from_cache and first.n_tokens == len(keys)
    assert np.allclose(first.mom2.double().numpy(), keys.T @ keys / len(keys), rtol=1e-5, atol=1e-7)
    assert np.allclose(first.mean.double().numpy(), keys.mean(axis=0), rtol=1e-5, atol=1e-7)

    def no_recompute(*args, **kwargs):
        raise AssertionError("the key statistics were recomputed")

    monkeypatch.setattr(covariance_module, "compute_statistics", no_recompute)
    second = key_statistics(km, 1, CORPUS, cache_dir=tmp_path, batch_size=5)
    assert second.from_cache and second.n_tokens == first.n_tokens
    assert torch.equal(second.mom2, first.mom2) and torch.equal(second.mean, first.mean)
    # An editor run reads them too.
    edit = editor(tmp_path, layer=1, cache_dir=str(tmp_path)).apply(km, [REQUEST])
    assert edit.report.details.covariance_from_cache
    # Editing layer 1's own value projection keeps them valid; a change below it does not.
    assert key_statistics(km, 1, CORPUS, cache_dir=tmp_path).from_cache
    edit.revert()
    with torch.no_grad():
        km.value_weight(0).mul_(1.5)
    with pytest.raises(AssertionError, match="recomputed"):
        key_statistics(km, 1, CORPUS, cache_dir=tmp_path)
    # Another corpus or sample size is another entry.
    monkeypatch.undo()
    assert not key_statistics(km, 1, CORPUS[:6], cache_dir=tmp_path).from_cache
    assert not key_statistics(km, 1, CORPUS, cache_dir=tmp_path, n_tokens=40).from_cache


def test_key_statistics_take_at_most_the_requested_tokens(tiny_factory, tmp_path):
    km = tiny_factory("llama")
    stats = key_statistics(km, 0, CORPUS, n_tokens=25, max_length=8, cache=False)
    assert stats.n_tokens == 25 and stats.path is None
    ids = [km.tokenizer(t)["input_ids"][:8] for t in CORPUS]
    texts_ids = []
    total = 0
    for row in ids:
        row = row[: 25 - total]
        texts_ids.append(row)
        total += len(row)
        if total >= 25:
            break
    keys = []
    handle = km.value_proj(0).register_forward_pre_hook(lambda _m, args: keys.append(args[0][0].double().numpy()))
    with torch.no_grad():
        for row in texts_ids:
            km.model(input_ids=torch.tensor([row]))
    handle.remove()
    keys = np.concatenate(keys)
    assert np.allclose(stats.mom2.double().numpy(), keys.T @ keys / len(keys), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("family", FAMILIES)
def test_revert_restores_bit_for_bit_and_only_the_value_projection_changes(tiny_factory, tmp_path, family):
    km = tiny_factory(family)
    original = snapshot(km)
    edit = editor(tmp_path).apply(km, [REQUEST])
    name = value_location(km, 0)[0]
    assert changed(km, original) == [name]
    assert [(p.name, p.whole) for p in edit.report.parameters] == [(name, True)]
    assert edit.touched_parameters == [name]
    edit.revert()
    assert same(km, original)
    assert ledger_for(km).touched_rows == {}


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("rome_first_reverted", [True, False])
def test_stacked_with_a_knowledge_neuron_edit_of_the_same_layer(tiny_factory, tmp_path, family, rome_first_reverted):
    km = tiny_factory(family)
    original = snapshot(km)
    kn = kn_edit.update_fact(km, ["The capital of France is"], "Paris", "Rome", rule="paper",
                             neurons=[Neuron(0, 3), Neuron(0, 7)], force=True)
    after_kn = snapshot(km)
    rome = editor(tmp_path).apply(km, [OTHER])
    assert changed(km, after_kn) == [value_location(km, 0)[0]]
    first, second = (rome, kn) if rome_first_reverted else (kn, rome)
    first.revert()
    if rome_first_reverted:
        assert same(km, after_kn)
    second.revert()
    assert same(km, original)
    assert ledger_for(km).touched_rows == {}


@pytest.mark.parametrize("family", FAMILIES)
def test_an_exception_inside_compute_leaves_the_model_unchanged(tiny_factory, tmp_path, monkeypatch, family):
    km = tiny_factory(family)
    original = snapshot(km)
    calls = {"n": 0}
    real = values_module.objective

    def failing(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 6:  # in the second request's optimisation: the first is a trial change by then
            raise RuntimeError("boom")
        return real(*args, **kwargs)

    monkeypatch.setattr(values_module, "objective", failing)
    with pytest.raises(RuntimeError, match="boom"):
        editor(tmp_path, stop_loss=0.0).apply(km, [REQUEST, OTHER])
    assert calls["n"] == 6
    assert same(km, original)
    assert ledger_for(km).active_edits == [] and ledger_for(km).touched_rows == {}
    assert hook_count(km) == 0


@pytest.mark.parametrize("family", FAMILIES)
def test_requests_are_edited_one_after_another(tiny_factory, tmp_path, family):
    km = tiny_factory(family)
    original = plain_weight(km, 0)
    ed = editor(tmp_path, n_prefixes=0)  # prefixes are sampled from the model as it is: here the edited one
    a = ed.apply(km, [REQUEST])
    b = ed.apply(km, [OTHER])
    sequential = plain_weight(km, 0)
    b.revert()
    a.revert()
    both = ed.apply(km, [REQUEST, OTHER])
    assert len(both.patches) == 1
    assert np.allclose(plain_weight(km, 0), sequential, rtol=1e-5, atol=1e-6 * np.abs(sequential - original).max())
    assert len(both.report.details.requests) == 2
    both.revert()
    assert np.array_equal(plain_weight(km, 0), original)


def test_the_value_optimisation_lowers_the_objective(tiny_factory, tmp_path):
    # Random tiny models can hardly be made to answer anything through one position (their attention dilutes it),
    # so whether the edit succeeds is measured on smollm2 (configs/compare/rome_layers_smollm2.yaml); here: the v* objective falls.
    km = tiny_factory("llama", n_layers=3)
    edit = editor(tmp_path, steps=10).apply(km, [REQUEST])
    details = edit.report.details.requests[0]
    assert details.steps == 10 and len(details.losses) == 10
    assert details.nll_last < details.nll_first and details.loss_last < details.loss_first
    edit.revert()


def test_the_cached_suffix_forward_equals_the_full_forward(tiny_factory):
    from kn_edit.editing.keyvalue.target import _groups, _suffix_logits, added_output, kl_row, rewrite_rows

    for family in FAMILIES:
        km = tiny_factory(family, n_layers=3)
        rows = rewrite_rows(km, REQUEST.prompts, "France", "Rome", ["", "Hello there"]) + [kl_row(km, "France")]
        delta = torch.randn(km.d_model, generator=torch.Generator().manual_seed(0))
        for group in _groups(km, rows):
            with torch.no_grad():
                got = _suffix_logits(km, km.value_proj(1), group, delta)
            for j, i in enumerate(group.members):
                row = rows[i]
                with added_output(km.value_proj(1), torch.tensor([0]), torch.tensor([row.subject]), delta), torch.no_grad():
                    full = km.model(input_ids=row.input_ids[None]).logits[0, row.subject :]
                assert torch.allclose(got[j], full, atol=1e-5), family
            # only some (row, position) pairs through the output head: the same logits
            picks = [(j, p) for j in range(len(group.members)) for p in range(got.shape[1]) if (j + p) % 2 == 0]
            select = (torch.tensor([j for j, _ in picks]), torch.tensor([p for _, p in picks]))
            with torch.no_grad():
                some = _suffix_logits(km, km.value_proj(1), group, delta, select)
            assert some.shape == (len(picks), got.shape[-1])
            assert torch.allclose(some, got[select[0], select[1]], atol=1e-5), family


@pytest.mark.parametrize("family,window", [("gpt2", None), ("llama", None), ("qwen2", None), ("gpt_neox", None),
                                           ("gptj", None), ("gemma3", 40), ("gemma3", 4)])
def test_the_padded_step_forward_equals_the_full_forward(family, window):
    """Every row in one padded forward (prefixes right-aligned in a masked cache, suffixes padded on the right):
    the logits at the wanted positions equal each row's own full forward. gemma3 with a window shorter than the
    padded rows falls back to one forward per group, with the same logits."""
    import kn_edit
    from kn_edit.editing.keyvalue.target import _Steps, added_output, kl_row, rewrite_rows
    from tiny_models import build_model

    model, tok = build_model(family, n_layers=3, **({"sliding_window": window} if window else {}))
    km = kn_edit.wrap(model, tok, name=f"tiny-{family}")
    rows = rewrite_rows(km, REQUEST.prompts, "France", "Rome", ["", "Hello there", "A b c d e f"]) + [kl_row(km, "France")]
    assert len({r.subject for r in rows}) > 2, "the rows must need padding"
    # every position from the subject's last token on, in an order that is not the rows' own
    wanted = [(i, p) for i, r in enumerate(rows) for p in range(r.subject, len(r.input_ids))][::-1]
    delta = torch.randn(km.d_model, generator=torch.Generator().manual_seed(0))
    steps = _Steps(km, rows, wanted)
    assert (steps.plan is not None) == (window != 4)
    with torch.no_grad():
        got = steps.logits(km.value_proj(1), delta)
    assert got.shape == (len(wanted), km.model.config.vocab_size)
    for k, (i, p) in enumerate(wanted):
        row = rows[i]
        with added_output(km.value_proj(1), torch.tensor([0]), torch.tensor([row.subject]), delta), torch.no_grad():
            full = km.model(input_ids=row.input_ids[None]).logits[0, p]
        assert torch.allclose(got[k], full, atol=1e-5), (family, i, p)
    # and δ's gradient through the padded forward equals the one through the grouped forwards
    delta.requires_grad_(True)
    grads = [torch.autograd.grad(_Steps(km, rows, wanted, padded=padded).logits(km.value_proj(1), delta)
                                 .logsumexp(-1).sum(), [delta])[0] for padded in (True, False)]  # fmt: skip
    assert torch.allclose(grads[0], grads[1], rtol=1e-4, atol=1e-5 * float(grads[1].norm()))


def test_keys_are_read_at_the_subject_s_last_token(tiny_factory):
    km = tiny_factory("gpt2")
    text = "The capital of France is"
    ids, pos = token_at(km.tokenizer, text, text.index("France") + len("France"))
    assert km.tokenizer.decode(ids[: pos + 1]).endswith("France")
    assert not km.tokenizer.decode(ids[:pos]).endswith("France")
    texts = subject_texts(km, "France", [text], ["", "Hello there"], whole_subject=False)
    assert [km.tokenizer.decode(t.input_ids[: t.position + 1]) for t in texts] == ["The capital of France",
                                                                                   "Hello there. The capital of France"]
    texts = subject_texts(km, "France", [text], ["", "Hello there"], whole_subject=True)
    assert [km.tokenizer.decode(t.input_ids[: t.position + 1]) for t in texts] == ["France", "Hello there. France"]


def test_subject_missing_or_not_in_a_prompt_is_a_clear_error(tiny_factory, tmp_path):
    km = tiny_factory("llama")
    original = snapshot(km)
    no_subject = EditRequest(prompts=REQUEST.prompts, old="Paris", new="Rome")
    with pytest.raises(EditError, match="needs the subject"):
        editor(tmp_path).apply(km, [no_subject])
    wrong = EditRequest(prompts=("The capital of France is", "Its capital is"), old="Paris", new="Rome", subject="France")
    with pytest.raises(EditError, match="'France' does not occur in prompt 'Its capital is'"):
        editor(tmp_path).apply(km, [wrong])
    assert same(km, original)


def test_bad_settings_and_models(tiny_factory, tmp_path):
    with pytest.raises(ConfigError, match="key_text"):
        RomeEditor(key_text="middle")
    with pytest.raises(ConfigError, match="clamp_norm_factor"):
        make_editor("rome", overrides=["clamp_norm_factor=0"])
    with pytest.raises(ConfigError, match="steps"):
        RomeEditor(steps=0)
    with pytest.raises(EditError, match="cannot erase"):
        RomeEditor().apply(tiny_factory("llama"), [EditRequest(prompts=("The capital of France is",), old="Paris",
                                                               subject="France")])
    with pytest.raises(EditError, match="layer 5 does not exist"):
        editor(tmp_path, layer=5).apply(tiny_factory("llama"), [REQUEST])
    with pytest.raises(EditError, match="causal"):
        editor(tmp_path).apply(tiny_factory("bert"), [EditRequest(prompts=("France is [MASK].",), old="paris",
                                                                  new="rome", subject="France")])


def test_registry_and_default_layers(tiny_factory):
    assert isinstance(make_editor("rome"), RomeEditor)
    assert make_editor("rome", overrides=["layer=3"]).settings.layer == 3
    assert default_layer(tiny_factory("llama")) == 0  # never the last layer
    assert default_layer(tiny_factory("gpt2", n_layers=12)) == 4


def test_a_rome_edit_saves_as_a_patch_that_applies_and_reverts(tiny_factory, tmp_path):
    km = tiny_factory("gpt2")
    original = snapshot(km)
    edit = editor(tmp_path, steps=3).apply(km, [REQUEST])
    edited = snapshot(km)
    edit.save(tmp_path / "rome.kn-patch")
    edit.revert()
    again = kn_edit.apply_patch(km, tmp_path / "rome.kn-patch")
    assert same(km, edited)
    again.revert()
    assert same(km, original)
