"""Null-space preservation (AlphaEdit): the projected update against the paper's formula written plainly and its
optimality; ROME, MEMIT and the knowledge-neuron gradient solve leave the layer's output on every preserved key
unchanged; earlier edits' keys are carried through the ledger; reverts bit for bit."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import kn_edit
from helpers import same, snapshot
from kn_edit import ConfigError, EditError, Neuron
from kn_edit.editing import EditRequest, make_editor
from kn_edit.editing.ledger import ledger_for
from kn_edit.editing.memit import MemitEditor
from kn_edit.editing.nullspace import edited_keys, null_space, projected_update
from kn_edit.editing.rome import RomeEditor, key_statistics
from plain_values import plain_keys, plain_weight
from tiny_models import CORPUS

FAMILIES = ["gpt2", "llama"]
FRANCE = EditRequest(prompts=("The capital of France is",), old="Paris", new="Rome", subject="France")
JAPAN = EditRequest(prompts=("The capital of Japan is",), old="Tokyo", new="Berlin", subject="Japan")
# Few tokens of preserved text (fewer than d_ff = 64), so C has an exact null space and "unchanged" is exact.
PRESERVED = CORPUS[:3]
COMMON = dict(n_prefixes=1, prefix_length=3, steps=3, lr=0.5, clamp_norm_factor=1e4, weight_decay=0.0, null_space=True,
              null_space_threshold=1e-6)






def test_projected_update_is_the_paper_s_formula_and_its_minimiser():
    g = torch.Generator().manual_seed(0)
    d_in, d_out = 10, 4
    k0 = torch.randn(d_in, 6, generator=g, dtype=torch.float64)  # preserved keys: rank 6 of 10
    space = null_space(k0 @ k0.T / 6, 1e-8)
    assert space.kept == 4
    keys, res = torch.randn(d_in, 2, generator=g, dtype=torch.float64), torch.randn(d_out, 2, generator=g, dtype=torch.float64)
    kp = torch.randn(d_in, 3, generator=g, dtype=torch.float64)
    ridge = 0.5
    got = projected_update(res, keys, space, ridge, kp).numpy()
    # plainly: the null space from numpy's eigendecomposition, then R Kᵀ P (K_p K_pᵀ P + K Kᵀ P + α I)⁻¹
    c = (k0 @ k0.T / 6).numpy()
    w, v = np.linalg.eigh(c)
    basis = v[:, w < 1e-8 * w.max()]
    p = basis @ basis.T
    alpha = ridge * np.diag(c).mean()
    k, r, kpn = keys.numpy(), res.numpy(), kp.numpy()
    expected = r @ k.T @ p @ np.linalg.inv(kpn @ kpn.T @ p + k @ k.T @ p + alpha * np.eye(d_in))
    assert np.allclose(got, expected, atol=1e-10)
    assert np.allclose(got @ k0.numpy(), 0, atol=1e-10)  # the preserved keys' outputs do not move
    # the minimiser of ‖ΔK − R‖² + ‖ΔK_p‖² + α‖Δ‖² over Δ = X P: the gradient in X vanishes
    grad = (got @ k - r) @ k.T @ p + got @ kpn @ kpn.T @ p + alpha * got @ p
    assert np.abs(grad).max() < 1e-9


def test_key_statistics_compute_their_null_space_once():
    from kn_edit.editing.keyvalue.statistics import KeyStatistics

    g = torch.Generator().manual_seed(1)
    k = torch.randn(8, 5, generator=g)
    stats = KeyStatistics(layer=0, mom2=k @ k.T / 5, mean=k.mean(dim=1), n_tokens=5, corpus="t", from_cache=False,
                          seconds=0.0)  # fmt: skip
    first = stats.null_space(1e-6)
    assert stats.null_space(1e-6) is first  # memoized
    plain = null_space(stats.mom2, 1e-6)
    assert first.kept == plain.kept == 3 and torch.equal(first.projector, plain.projector)
    assert stats.null_space(0.5) is not first


def test_no_null_space_is_a_clear_error():
    with pytest.raises(EditError, match="no null space"):
        null_space(torch.eye(5, dtype=torch.float64), 0.5)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", ["rome", "memit"])
def test_the_layer_output_on_every_preserved_key_is_unchanged(tiny_factory, tmp_path, family, method):
    km = tiny_factory(family, n_layers=3)
    original = snapshot(km)
    layers = [0] if method == "rome" else [0, 1]
    before = {l: plain_weight(km, l) for l in layers}
    preserved = {l: plain_keys(km, l, PRESERVED) for l in layers}  # on the unedited model, as C
    assert all(len(k) < km.d_ff for k in preserved.values())
    if method == "rome":
        editor = RomeEditor(key_texts=PRESERVED, layer=0, cache_dir=str(tmp_path), **COMMON)
    else:
        editor = MemitEditor(key_texts=PRESERVED, layers=layers, cache_dir=str(tmp_path), **COMMON)
    edit = editor.apply(km, [FRANCE, JAPAN])
    for l in layers:
        change = plain_weight(km, l) - before[l]
        assert np.abs(change).max() > 0
        moved = change @ preserved[l].T  # [d_model, tokens]: how the layer's output on each preserved key moved
        # float tolerance: C is stored in float32 (its null space is exact to ~1e-7 of its scale) and so is W + ΔW
        rounding = 1e-5 * np.abs(plain_weight(km, l)).max() * np.abs(preserved[l]).sum(axis=1).max()
        assert np.abs(moved).max() <= rounding
        assert np.abs(change @ np.stack([r.key.numpy() for r in _requests(edit)]).T).max() > 1e3 * rounding
    edit.revert()
    assert same(km, original)


def _requests(edit):
    """Keys the edit was solved for, as objects with ``.key`` [d_ff]: ROME's requests or MEMIT's first layer's."""
    details = edit.report.details
    if hasattr(details, "updates"):
        return [type("K", (), {"key": k})() for k in details.updates[0].keys]
    return details.requests


@pytest.mark.parametrize("family", FAMILIES)
def test_earlier_edits_keys_are_carried_through_the_ledger(tiny_factory, tmp_path, family):
    km = tiny_factory(family, n_layers=3)
    original = snapshot(km)
    rome = RomeEditor(key_texts=PRESERVED, layer=0, cache_dir=str(tmp_path), **COMMON)
    assert edited_keys(km, 0) is None
    first = rome.apply(km, [FRANCE])
    carried = edited_keys(km, 0)
    assert torch.equal(carried, first.report.details.requests[0].key[None].double())
    memit = MemitEditor(key_texts=PRESERVED, layers=[0, 1], cache_dir=str(tmp_path), **COMMON).apply(km, [JAPAN])
    # every key MEMIT's update of a layer was solved for is held (with the default refit, JAPAN, short on a tiny
    # random model, has its prompt's own key beside the prefix-averaged one), after ROME's at layer 0
    solved = [update.keys.shape[0] for update in memit.report.details.updates]
    assert solved[1] >= 1 and edited_keys(km, 1).shape == (solved[1], km.d_ff)
    assert edited_keys(km, 0).shape == (1 + solved[0], km.d_ff)
    # The soft term K_p: with the first edit's key held, the second edit moves its output less than without.
    k = first.report.details.requests[0].key.double().numpy()
    stats = key_statistics(km, 0, PRESERVED, cache_dir=tmp_path).mom2
    space = null_space(stats, COMMON["null_space_threshold"])
    res, new_key = torch.randn(km.d_model, 1, dtype=torch.float64), torch.from_numpy(k + 0.3 * np.random.default_rng(0).standard_normal(km.d_ff))[:, None]
    held = projected_update(res, new_key, space, 0.1, torch.from_numpy(k)[:, None]).numpy()
    free = projected_update(res, new_key, space, 0.1, None).numpy()
    assert np.linalg.norm(held @ k) < np.linalg.norm(free @ k)
    first.revert()
    assert edited_keys(km, 0).shape == (solved[0], km.d_ff)  # a reverted edit's keys are no longer held
    memit.revert()
    assert edited_keys(km, 0) is None and same(km, original) and ledger_for(km).touched_rows == {}


@pytest.mark.parametrize("family", FAMILIES)
def test_the_knowledge_neuron_solve_leaves_preserved_activations_unchanged(tiny_factory, family):
    """The value-vector change δ [n, d_model] moves the FFN output by δᵀ a(x); with 40 neurons and fewer preserved
    tokens than that, the co-activation has an exact null space and δᵀ a(x) = 0 on every preserved token."""
    km = tiny_factory(family)
    original = snapshot(km)
    neurons = [Neuron(1, i) for i in range(40)]
    generic = ["The capital of Italy is", "Rome is located in"]
    before = kn_edit.editing.values.value_vectors(km, neurons).double()
    editor = make_editor("kn", overrides={"null_space": True, "null_space_threshold": 1e-6, "on_failure": "apply",
                                          "solve_steps": 3, "force": True, "max_change": 1e6}, neurons=neurons, generic_prompts=generic)
    edit = editor.apply(km, [FRANCE])
    delta = kn_edit.editing.values.value_vectors(km, neurons).double() - before  # [n, d_model]
    assert float(delta.abs().max()) > 0
    acts = plain_keys(km, 1, generic)[:, [n.index for n in neurons]]  # [tokens, n], value projection unchanged upstream
    assert len(acts) < len(neurons)
    moved = acts @ delta.numpy()  # [tokens, d_model]
    assert np.abs(moved).max() <= 1e-5 * float(delta.abs().max()) * np.abs(acts).max()
    edit.revert()
    assert same(km, original)


def test_settings():
    with pytest.raises(ConfigError, match="null_space_threshold"):
        make_editor("rome", overrides=["null_space_threshold=2"])
    with pytest.raises(ConfigError, match="null_space_ridge"):
        make_editor("rome", overrides=["null_space_ridge=0"])
    with pytest.raises(ConfigError, match="gradient"):
        make_editor("kn", overrides=["null_space=true", "direction=contrast"])
    with pytest.raises(ConfigError, match="rule=signed"):
        make_editor("kn-paper", overrides=["null_space=true"])
    assert make_editor("kn", overrides=["null_space=true"]).settings.null_space
