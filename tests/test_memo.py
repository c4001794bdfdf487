"""Per-model memory of what depends on the weights alone (kn_edit.editing.memo): the weights' state, and the text
guard's unedited NLL, the generic prompts' slot activations and token activations read from it, each equal to
a fresh plain computation after every change of the weights (an edit applied or reverted, a patch loaded, a
write outside the ledger), and computed once while the weights stay as they are (trials included)."""

from __future__ import annotations

import gc
import math

import pytest
import torch

from helpers import hook_count
from kn_edit import EditError, Neuron
from kn_edit.editing import apply_patch, guard
from kn_edit.editing.filters import GENERIC_PROMPTS, slot_activations
from kn_edit.editing.ledger import SliceChange, commit
from kn_edit.editing.memo import weights_state
from kn_edit.editing.preserve import token_activations
from kn_edit.editing.values import value_changes
from kn_edit.models.adapters import first_submodule
from tiny_models import FAMILIES

TEXTS = ("The capital of France is Paris, a city on the Seine.", "Rome is the capital of Italy.",
         "Tokyo is a city in Japan.")


def plain_nll(km, texts) -> float:
    """Mean next-token NLL, one passage at a time, each cut at the guard's token limit."""
    total, count = 0.0, 0
    with torch.no_grad():
        for t in texts:
            ids = km.tokenizer(t, add_special_tokens=True)["input_ids"][: guard.GUARD_TOKENS]
            logp = torch.log_softmax(km.model(input_ids=torch.tensor([ids])).logits[0, :-1].double(), dim=-1)
            total -= float(logp[torch.arange(len(ids) - 1), torch.tensor(ids[1:])].sum())
            count += len(ids) - 1
    return total / count


def plain_change(km, changes) -> float:
    before = plain_nll(km, TEXTS)
    trial = commit(km, "plain", [], changes)
    try:
        after = plain_nll(km, TEXTS)
    finally:
        trial.revert()
    return math.expm1(after - before)


def changes_at(km, layer: int, scale: float) -> list[SliceChange]:
    neurons = [Neuron(layer, 1), Neuron(layer, 4)]
    gen = torch.Generator().manual_seed(layer + int(scale * 100))
    return value_changes(km, neurons, scale * torch.randn(2, km.d_model, generator=gen), additive=True)


@pytest.fixture
def counted(monkeypatch):
    """Counts the guard's passes of the unedited model."""
    calls = {"n": 0}
    real = guard._measure

    def counting(*args, **kwargs):
        calls["n"] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(guard, "_measure", counting)
    return calls


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_guard_change_is_the_plain_one_whatever_happened_to_the_weights(tiny_factory, tmp_path, counted, family):
    km = tiny_factory(family)
    a, b = changes_at(km, 1, 0.5), changes_at(km, 0, 0.3)

    def check(changes, measured: bool) -> float:
        start = counted["n"]
        got = guard.text_change(km, changes, TEXTS)
        assert got == pytest.approx(plain_change(km, changes), rel=1e-3, abs=5e-6)  # float32 NLLs of ~6
        assert counted["n"] - start == int(measured)  # the unedited pass made again, or remembered
        return got

    first = check(a, True)
    check(b, False)  # the trials of a and of plain_change were reverted: same weights
    edit = commit(km, "applied", [], changes_at(km, 1, 0.8))
    check(a, True)
    edit.save(tmp_path / "p.safetensors")
    edit.revert()
    assert check(a, False) == first
    patched = apply_patch(km, tmp_path / "p.safetensors")
    check(a, True)
    patched.revert()
    check(b, False)
    with torch.no_grad():  # a write outside the ledger
        km.value_weight(0)[0, 0] += 0.5
    check(a, True)


def test_weights_state(tiny_factory):
    km = tiny_factory("llama")
    start = weights_state(km)
    commit(km, "trial", [], changes_at(km, 1, 0.5)).revert()
    assert weights_state(km) == start  # applied and reverted: the same weights, though torch counted two writes
    first = commit(km, "one", [], changes_at(km, 1, 0.5))
    applied = weights_state(km)
    assert applied != start
    first.revert()
    assert weights_state(km) == start
    del first
    gc.collect()
    second = commit(km, "two", [], changes_at(km, 1, 0.9))  # may reuse the id of the first, never its state
    assert weights_state(km) not in (start, applied)
    second.revert()
    with torch.no_grad():
        km.value_weight(1)[0, 0] += 1.0
    moved = weights_state(km)
    assert moved != start
    commit(km, "trial", [], changes_at(km, 1, 0.5)).revert()  # a ledger write after an outside one
    assert weights_state(km) == moved
    with torch.no_grad():
        km.model.get_input_embeddings().weight[0, 0] += 1.0  # a tensor the ledger never touched
    assert weights_state(km) != moved


def plain_slot_activations(km) -> torch.Tensor:
    rows = []
    with torch.no_grad():
        for prompt in GENERIC_PROMPTS:
            ids = torch.tensor([km.tokenizer(prompt)["input_ids"]])
            rows.append(_last(km, ids))
    return torch.stack(rows).abs().quantile(0.75, dim=0)


def _last(km, ids: torch.Tensor) -> torch.Tensor:
    """[n_layers, d_ff]: every layer's value-projection input at the last token, read with plain hooks."""
    got = {}
    handles = [km.value_proj(l).register_forward_pre_hook(lambda _m, args, l=l: got.__setitem__(l, args[0][0, -1].clone()))
               for l in range(km.n_layers)]
    try:
        km.model(input_ids=ids)
    finally:
        for h in handles:
            h.remove()
    return torch.stack([got[l] for l in range(km.n_layers)]).float()


def plain_token_activations(km, neurons) -> torch.Tensor:
    out = []
    with torch.no_grad():
        for prompt in GENERIC_PROMPTS:
            ids = torch.tensor([km.tokenizer(prompt)["input_ids"]])
            got = {}
            handles = [km.value_proj(l).register_forward_pre_hook(lambda _m, args, l=l: got.__setitem__(l, args[0][0].clone()))
                       for l in {n.layer for n in neurons}]
            try:
                km.model(input_ids=ids)
            finally:
                for h in handles:
                    h.remove()
            out.append(torch.stack([got[n.layer][:, n.index] for n in neurons], dim=1))
    return torch.cat(out).float()


@pytest.mark.parametrize("every_layer", [True, False], ids=["every-layer", "layers-asked-for"])
@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_generic_activations_follow_the_weights(tiny_factory, monkeypatch, family, every_layer):
    from kn_edit.editing import preserve

    if not every_layer:  # a model too large to keep every layer's token activations
        monkeypatch.setattr(preserve, "_MEMO_BYTES", 0)
    km = tiny_factory(family)
    one, other = [Neuron(1, 3), Neuron(0, 5)], [Neuron(1, 7), Neuron(1, 2)]

    def check():
        slot = slot_activations(km, GENERIC_PROMPTS)
        torch.testing.assert_close(slot, plain_slot_activations(km), rtol=1e-5, atol=1e-6)
        for neurons in (one, other):
            got = token_activations(km, GENERIC_PROMPTS, neurons)
            torch.testing.assert_close(got, plain_token_activations(km, neurons), rtol=1e-5, atol=1e-6)
        return slot

    first = check()
    assert slot_activations(km, GENERIC_PROMPTS) is first  # remembered
    edit = commit(km, "applied", [], changes_at(km, 0, 2.0))  # layer 0 moves the activations of layer 1
    assert not torch.equal(check(), first)
    edit.revert()
    assert slot_activations(km, GENERIC_PROMPTS) is first
    with torch.no_grad():
        km.value_weight(0)[:, :].mul_(1.5)
    assert not torch.equal(check(), first)


def full_pass_change(km, changes) -> float:
    """The guard's change with every block computed, in the guard's own batch (no replay, nothing remembered)."""
    measured = guard._measure(km, TEXTS, guard.GUARD_TOKENS)
    trial = commit(km, "plain", [], changes)
    try:
        after = guard._mean_nll(km, measured.ids, measured.mask)
    finally:
        trial.revert()
    return math.expm1(after - measured.nll)


@pytest.mark.parametrize("family", FAMILIES)
def test_the_pass_from_the_lowest_changed_block_equals_the_whole_pass(tiny_factory, family):
    km = tiny_factory(family, n_layers=3)
    blocks = list(first_submodule(km.model, km.adapter.layers))
    ran = []
    handles = [b.register_forward_hook(lambda _m, _a, _o, i=i: ran.append(i)) for i, b in enumerate(blocks)]
    try:
        guard.text_change(km, changes_at(km, 2, 0.1), TEXTS)  # the unedited pass, remembered from here on
        for layer in (2, 1, 0):
            changes = changes_at(km, layer, 0.8)
            expected = full_pass_change(km, changes)
            ran.clear()
            assert guard.text_change(km, changes, TEXTS) == expected  # bit for bit
            assert ran == list(range(layer, 3))  # the blocks below handed back their kept outputs
        embeddings = km.model.get_input_embeddings().weight
        name = next(n for n, p in km.model.named_parameters() if p is embeddings)
        outside = [SliceChange(name, 0, torch.tensor([3]), torch.ones(1, embeddings.shape[1]))]
        ran.clear()
        assert guard.text_change(km, outside, TEXTS) == full_pass_change(km, outside)
        assert ran[:3] == [0, 1, 2]
    finally:
        for h in handles:
            h.remove()
    assert list(first_submodule(km.model, km.adapter.layers)) == blocks
    assert hook_count(km) == 0


def test_blocks_are_put_back_after_an_exception(tiny_factory):
    km = tiny_factory("llama", n_layers=3)
    blocks = list(km.model.model.layers)
    guard.text_change(km, changes_at(km, 2, 0.5), TEXTS)  # the unedited pass, remembered

    def boom(_module, _args, _output):
        raise RuntimeError("boom")

    handle = km.model.model.layers[2].register_forward_hook(boom)
    try:
        with pytest.raises(RuntimeError, match="boom"):
            guard.text_change(km, changes_at(km, 2, 0.5), TEXTS)
    finally:
        handle.remove()
    assert list(km.model.model.layers) == blocks
    assert not km.active_edits


def test_a_sample_too_short_to_measure_is_refused(tiny_factory):
    km = tiny_factory("gpt2")
    with pytest.raises(EditError, match="guard's sample"):
        guard.text_change(km, changes_at(km, 1, 0.5), ("a",))
    assert not km.active_edits
