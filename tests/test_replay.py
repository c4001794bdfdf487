"""Blocks below a change replayed from a kept pass (kn_edit.models.replay) give the whole pass's numbers, bit for
bit: the text-damage guard, evaluation's held-out text perplexity and the suppress/amplify probe."""

import pytest
import torch

from helpers import PASSAGES, ValueVectorEditor, hook_count, tiny_config, tiny_facts
from kn_edit.editing.ledger import SliceChange, commit
from kn_edit.models.likelihood import text_nll, tokenized_text
from kn_edit.models.neurons import Neuron
from kn_edit.models.replay import blocks_of, keeping, lowest_block, replaying
from tiny_models import FAMILIES

TEXTS = ["The capital of France is Paris, a city on the Seine.", "Rome is the capital of Italy.",
         "Tokyo is a large city in Japan, its capital.", "Berlin", "The river runs through the old town and on."]


def _change_in(km, layer: int, seed: int = 0) -> list[SliceChange]:
    """A random change of two rows of block ``layer``'s value projection."""
    name = next(n for n, p in km.model.named_parameters() if p is km.value_weight(layer))
    param = km.model.get_parameter(name)
    g = torch.Generator().manual_seed(seed)
    shape = list(param.shape)
    shape[0] = 2
    return [SliceChange(name, 0, torch.tensor([0, 3]), 0.7 * torch.randn(shape, generator=g, dtype=param.dtype))]


class _Ran:
    """Which blocks computed, in order (forward hooks on the real blocks: a replayed block does not run)."""

    def __init__(self, km) -> None:
        self.blocks = blocks_of(km)
        self.ran: list[int] = []
        self.handles = [b.register_forward_hook(lambda _m, _a, _o, i=i: self.ran.append(i))
                        for i, b in enumerate(self.blocks)]

    def close(self) -> None:
        for h in self.handles:
            h.remove()


@pytest.mark.parametrize("family", FAMILIES)
def test_replayed_blocks_give_the_whole_pass_bit_for_bit(tiny_factory, family):
    km = tiny_factory(family, n_layers=3)
    text = tokenized_text(km, TEXTS, 12)
    with keeping(km, 2**30) as kept:
        before = text_nll(km, text, batch_size=2)  # several forwards
    forwards = -(-len(text) // 2)
    assert len(kept.inputs) == forwards >= 2 and kept.outputs is not None
    blocks = list(blocks_of(km))
    ran = _Ran(km)
    try:
        for layer in (2, 1, 0):
            trial = commit(km, "trial", [], _change_in(km, layer))
            try:
                whole = text_nll(km, text, batch_size=2)
                ran.ran.clear()
                with replaying(km, kept, layer):
                    replayed = text_nll(km, text, batch_size=2)
            finally:
                trial.revert()
            assert torch.equal(replayed[0], whole[0]) and torch.equal(replayed[1], whole[1])
            assert not torch.equal(whole[0], before[0])  # the change moved the text: not a trivial equality
            assert ran.ran == list(range(layer, 3)) * forwards  # each forward ran from the changed block up only
    finally:
        ran.close()
    assert list(blocks_of(km)) == blocks and hook_count(km) == 0


def test_other_inputs_run_every_block(tiny_factory):
    """A forward whose inputs are not the kept ones (other texts, another batching) computes every block."""
    km = tiny_factory("llama", n_layers=3)
    with keeping(km, 2**30) as kept:
        text_nll(km, tokenized_text(km, TEXTS, 12), batch_size=2)
    other = tokenized_text(km, TEXTS[::-1], 12)
    ran = _Ran(km)
    try:
        trial = commit(km, "trial", [], _change_in(km, 2))
        try:
            whole = text_nll(km, other, batch_size=5)
            ran.ran.clear()
            with replaying(km, kept, 2):
                replayed = text_nll(km, other, batch_size=5)
        finally:
            trial.revert()
    finally:
        ran.close()
    assert torch.equal(replayed[0], whole[0])
    assert ran.ran == [0, 1, 2]


def test_nothing_is_kept_over_the_memory_budget(tiny_factory):
    km = tiny_factory("gpt2", n_layers=2)
    text = tokenized_text(km, TEXTS, 12)
    with keeping(km, 1024) as kept:
        text_nll(km, text, batch_size=5)
    assert kept.outputs is None
    ran = _Ran(km)
    try:
        with replaying(km, kept, 2):
            text_nll(km, text, batch_size=5)
    finally:
        ran.close()
    assert ran.ran == [0, 1]


def test_lowest_block(tiny_factory):
    km = tiny_factory("gpt2", n_layers=3)
    name = {p: n for n, p in km.model.named_parameters()}
    assert lowest_block(km, [name[km.value_weight(2)], name[km.value_weight(1)]]) == 1
    assert lowest_block(km, [name[km.model.get_input_embeddings().weight], name[km.value_weight(2)]]) == 0
    assert lowest_block(km, []) == 0


def test_probe_replays_the_baseline_and_equals_a_plain_probe(tiny_factory, monkeypatch):
    from kn_edit.locating import probe as probe_module

    km = tiny_factory("llama", n_layers=3)
    prompts, target, neurons = ["The capital of France is", "Paris is the capital of"], " Paris", [Neuron(2, 1), Neuron(2, 5)]
    ran = _Ran(km)
    try:
        fast = probe_module.probe(km, prompts, target, neurons, n_controls=2, seed=3)
        fast_ran = list(ran.ran)
        monkeypatch.setattr(probe_module, "_REPLAY_BYTES", 0)  # nothing kept: every condition computes every block
        ran.ran.clear()
        plain = probe_module.probe(km, prompts, target, neurons, n_controls=2, seed=3)
    finally:
        ran.close()
    for field in ("baseline", "suppressed", "amplified", "control_suppressed", "control_amplified"):
        assert torch.equal(getattr(fast, field), getattr(plain, field)), field
    assert not torch.equal(fast.suppressed, fast.baseline)
    assert ran.ran.count(0) == 7  # baseline, 2 conditions, 2 × 2 control conditions, each a whole pass ...
    assert fast_ran.count(0) == 1 and fast_ran.count(2) == 7  # ... or below layer 2 once, replayed after
    assert hook_count(km) == 0


def test_evaluation_text_perplexity_from_the_lowest_edited_block_equals_the_whole_pass(tiny_factory, tmp_path, monkeypatch):
    """Each edit's held-out text pass runs from the lowest block the edit touches (the blocks below replaying the
    unedited pass), and every fact's perplexity is the whole pass's, bit for bit."""
    from kn_edit.evaluation import evaluate
    from kn_edit.evaluation import module as module_

    km = tiny_factory("llama", n_layers=4)
    config = tiny_config(tmp_path, **{"probe.enabled": False})
    editor = ValueVectorEditor(scale=5.0)
    belows = []
    real = module_.replaying

    def spying(km_, kept, below):
        belows.append((kept.outputs is not None, below))
        return real(km_, kept, below)

    monkeypatch.setattr(module_, "replaying", spying)
    fast = evaluate(config, km=km, editor=editor, facts=tiny_facts(), passages=PASSAGES, write=False)
    assert belows and all(kept for kept, _ in belows) and any(below > 0 for _, below in belows)
    monkeypatch.setattr(module_, "_TEXT_REPLAY_BYTES", 0)
    plain = evaluate(config, km=km, editor=editor, facts=tiny_facts(), passages=PASSAGES, write=False)
    assert [r["text_ppl"] for r in fast.rows] == [r["text_ppl"] for r in plain.rows]
    assert fast.metrics["drift/mean_change"] == plain.metrics["drift/mean_change"] != 0


def test_the_same_ids_under_another_mask_run_every_block(tiny_factory):
    km = tiny_factory("llama", n_layers=2)
    ids = torch.tensor([[5, 9, 12, 7, 3]])
    with keeping(km, 2**30) as kept, torch.no_grad():
        km.model(input_ids=ids, attention_mask=torch.ones_like(ids))
    masked = torch.tensor([[1, 1, 1, 1, 0]])
    ran = _Ran(km)
    try:
        with torch.no_grad():
            whole = km.model(input_ids=ids, attention_mask=masked).logits
            ran.ran.clear()
            with replaying(km, kept, 2):
                replayed = km.model(input_ids=ids, attention_mask=masked).logits
    finally:
        ran.close()
    assert ran.ran == [0, 1] and torch.equal(replayed, whole)

