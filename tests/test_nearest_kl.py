"""kn-subject's ``nearest_kl``: other subjects' answers kept in v*'s objective, the update's reach simulated
(kn_edit.editing.keyvalue.neighbours). The simulated logits against the edited model's own, the KL against its
formula, the names against their shares written plainly, the objective's sum, and the editor's update against
the direction it simulated."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kn_edit import ConfigError
from kn_edit.editing import EditRequest, make_editor
from kn_edit.editing.keyvalue import neighbours as neighbours_module
from kn_edit.editing.keyvalue.keys import context_prefixes
from kn_edit.editing.keyvalue.nearest import MIN_SHARE, overlaps, substituted
from kn_edit.editing.keyvalue.neighbours import nearest_answer_rows, neighbour_kl, neighbour_rows
from kn_edit.editing.keyvalue.statistics import subject_statistics
from kn_edit.editing.keyvalue.target import kl_row, neighbour_logits, optimise_value, rewrite_rows
from plain_values import plain_keys, plain_weight, set_weight
from test_subject_metric import NEAR_NAMES, names_file, near_settings, plain_name_keys
from tiny_models import CORPUS

REQUEST = EditRequest(prompts=("The capital of France is",), old="Paris", new="Rome", subject="France")
TEXTS = ["The capital of Japan is", "Germany", "The Eiffel Tower is in the city of"]  # three lengths: padding


def plain_answer_logits(km, texts) -> torch.Tensor:
    """[n, vocab]: each text's next-token logits, one text at a time (no padding)."""
    out = []
    with torch.no_grad():
        for text in texts:
            ids = km.tokenizer(text, add_special_tokens=True)["input_ids"]
            out.append(km.model(input_ids=torch.tensor([ids])).logits[0, -1])
    return torch.stack(out)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_simulated_reach_gives_the_edited_models_logits(tiny_factory, family):
    """Shares wᵀk_t at every token and δ added in proportion: exactly the logits of the model with ΔW = δ wᵀ."""
    km = tiny_factory(family)
    g = torch.Generator().manual_seed(0)
    w = torch.randn(km.d_ff, generator=g, dtype=torch.float64) / km.d_ff
    delta = torch.randn(km.d_model, generator=g)
    rows = neighbour_rows(km, 0, TEXTS, w)
    keys = plain_keys(km, 0, TEXTS)  # every token of every text, in order
    lengths = [len(km.tokenizer(t, add_special_tokens=True)["input_ids"]) for t in TEXTS]
    got = [rows.shares[i, :n].double().numpy() for i, n in enumerate(lengths)]
    assert np.allclose(np.concatenate(got), keys @ w.numpy(), rtol=1e-4, atol=1e-6)
    assert all(not rows.shares[i, n:].any() for i, n in enumerate(lengths))  # padding
    with torch.no_grad():
        simulated = neighbour_logits(km, km.value_proj(0), rows, delta)
    before = plain_weight(km, 0)
    set_weight(km, 0, before + np.outer(delta.double().numpy(), w.numpy()))
    try:
        edited = plain_answer_logits(km, TEXTS)
    finally:
        set_weight(km, 0, before)
    assert torch.allclose(simulated, edited, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(edited, plain_answer_logits(km, TEXTS), atol=1e-3)  # δ reached them


def test_neighbour_kl_is_the_plain_formula():
    g = torch.Generator().manual_seed(1)
    logits, original = torch.randn(3, 11, generator=g), torch.randn(3, 11, generator=g)
    reference = torch.log_softmax(original, dim=-1)
    p, q = reference.exp().numpy(), torch.softmax(logits, dim=-1).numpy()
    plain = np.mean([sum(p[i, v] * np.log(p[i, v] / q[i, v]) for v in range(11)) for i in range(3)])
    assert abs(float(neighbour_kl(logits, reference)) - plain) < 1e-5
    assert float(neighbour_kl(original, reference)) == pytest.approx(0.0, abs=1e-6)


def test_nearest_answer_rows_are_the_largest_shares_in_the_edit_prompts(tiny_factory, tmp_path):
    km = tiny_factory("llama")
    prefixes = context_prefixes(km, 2, 3)
    found = subject_statistics(km, 0, names_file(tmp_path, NEAR_NAMES), len(NEAR_NAMES), prefixes,
                               cache_dir=tmp_path / "cache")
    keys = plain_name_keys(km, 0, NEAR_NAMES, prefixes)
    direction = torch.from_numpy(keys[NEAR_NAMES.index("Italy")] / (keys[NEAR_NAMES.index("Italy")] ** 2).sum())
    share = keys @ direction.numpy()
    prompts = ["The capital of France is", "France, whose capital is [Y]."]
    names, rows = nearest_answer_rows(km, 0, found, direction, "France", prompts, 3)
    allowed = [i for i, n in enumerate(NEAR_NAMES) if not overlaps(n, "France") and share[i] >= MIN_SHARE]
    assert names == [NEAR_NAMES[i] for i in sorted(allowed, key=lambda i: -share[i])[:3]]
    assert names[0] == "Italy"  # share 1 here: no upper bound, unlike the names preserve_nearest holds
    assert rows.texts == tuple(substituted(p, "France", n) for n in names for p in prompts)
    assert rows.texts[1] == f"{names[0]}, whose capital is"
    none, empty = nearest_answer_rows(km, 0, found, torch.zeros_like(direction), "France", prompts, 3)
    assert none == [] and empty is None  # nothing shares MIN_SHARE


def test_the_objective_adds_the_weighed_neighbour_kl(tiny_factory):
    km = tiny_factory("llama")
    rows = rewrite_rows(km, REQUEST.prompts, REQUEST.subject, REQUEST.new, ["", "Some text."])
    kl = kl_row(km, REQUEST.subject)
    near = neighbour_rows(km, 0, TEXTS, torch.full((km.d_ff,), 1.0 / km.d_ff, dtype=torch.float64))
    settings = dict(lr=0.5, steps=5, stop_loss=0.0, kl_factor=0.25, weight_decay=0.0, clamp_norm_factor=1e4)
    alone = optimise_value(km, 0, rows, kl, 1.0, **settings)
    unweighed = optimise_value(km, 0, rows, kl, 1.0, neighbours=near, neighbour_factor=0.0, **settings)
    assert torch.equal(alone.delta, unweighed.delta) and unweighed.neighbour_kl == []
    kept = optimise_value(km, 0, rows, kl, 1.0, neighbours=near, neighbour_factor=10.0, **settings)
    assert len(kept.neighbour_kl) == 5 and kept.neighbour_kl[0] == 0.0  # the reference: δ = 0 at the first step
    for total, nll, kl_term, near_term in zip(kept.losses, kept.nll, kept.kl, kept.neighbour_kl):
        assert total == pytest.approx(nll + 0.25 * kl_term + 10.0 * near_term, rel=1e-5, abs=1e-6)
    reference = torch.log_softmax(plain_answer_logits(km, TEXTS), dim=-1)
    with torch.no_grad():
        after = {name: float(neighbour_kl(neighbour_logits(km, km.value_proj(0), near, r.delta), reference))
                 for name, r in (("alone", alone), ("kept", kept))}
    assert after["kept"] < after["alone"]


def test_kn_subject_simulates_the_update_it_makes(tiny_factory, tmp_path, monkeypatch):
    """The direction whose reach v*'s objective simulated is the one the solve then used: ΔW = δ wᵀ on the edited
    neurons (fit=prompts and the start key: several keys moved by δ)."""
    km = tiny_factory("llama")
    seen = {}
    real = neighbours_module.neighbour_rows

    def recording(km_, layer, texts, direction):
        seen["direction"], seen["texts"] = direction, texts
        return real(km_, layer, texts, direction)

    monkeypatch.setattr(neighbours_module, "neighbour_rows", recording)
    before = plain_weight(km, 0)
    settings = near_settings(tmp_path, neurons=24, n_prefixes=1, fit="prompts", fit_subject_start=True, nearest_kl=2)
    edit = make_editor("kn-subject", overrides=settings, key_texts=CORPUS).apply(km, [REQUEST])
    change = plain_weight(km, 0) - before
    details = edit.report.details.requests[0]
    edit.revert()
    assert np.array_equal(plain_weight(km, 0), before)
    assert 1 <= len(details.kl_names) <= 2 and "France" not in details.kl_names
    assert list(seen["texts"]) == [f"The capital of {n} is" for n in details.kl_names]
    expected = np.outer(details.delta.double().numpy(), seen["direction"].numpy())
    assert np.abs(change - expected).max() <= 1e-5 * np.abs(expected).max()
    assert set(np.flatnonzero(seen["direction"].numpy())) <= set(details.neurons)
    free = make_editor("kn-subject", overrides={**settings, "nearest_kl": 0}, key_texts=CORPUS).apply(km, [REQUEST])
    assert free.report.details.requests[0].kl_names == []
    free.revert()


def test_bad_nearest_kl_settings_are_clear_errors():
    for bad in (dict(nearest_kl=-1), dict(nearest_kl=True), dict(nearest_kl=1.5), dict(nearest_kl_factor=-1.0),
                dict(nearest_kl_factor=float("nan")), dict(nearest_kl_factor="x")):
        with pytest.raises(ConfigError):
            make_editor("kn-subject", overrides=bad)
