"""Weight changes carried by rows of one batch (kn_edit.models.row_changes) equal the changes applied to the
model, one at a time: the same logits to float tolerance, the same greedy generations."""

import pytest
import torch

from kn_edit.editing.ledger import SliceChange, commit
from kn_edit.evaluation.fluency import greedy_generations, greedy_generations_changed
from kn_edit.evaluation.module import change_plan
from kn_edit.models.row_changes import RowChange, row_change_plan, rows_carry

PROMPTS = [["Paris", "The capital of France is"], ["Tokyo is a city in"], ["Rome", "Berlin is", "Oslo"]]


def _changes(km, seed: int) -> list[SliceChange]:
    """Random changes of a few slices of several linear layers, along both axes, a bias where there is one."""
    g = torch.Generator().manual_seed(seed)
    names = [n for n, p in km.model.named_parameters() if p.dim() == 2 and n != "lm_head.weight"
             and "embed" not in n and "wte" not in n and "wpe" not in n]
    biases = [n for n, p in km.model.named_parameters() if p.dim() == 1 and n.replace(".bias", ".weight") in names]
    picked = [names[(seed * 3 + k) % len(names)] for k in range(3)] + biases[seed % max(1, len(biases)):][:1]
    changes = []
    for k, name in enumerate(picked):
        param = km.model.get_parameter(name)
        dim = (seed + k) % param.dim()
        index = torch.randperm(param.shape[dim], generator=g)[:2].sort().values
        shape = list(param.shape)
        shape[dim] = len(index)
        changes.append(SliceChange(name, dim, index, 0.5 * torch.randn(shape, generator=g, dtype=param.dtype)))
    return changes


def _as_rows(changes):
    return [RowChange(c.name, c.dim, c.index, c.value) for c in changes]


@pytest.mark.parametrize("family", ["gpt2", "llama", "gemma3", "gpt_neox"])
def test_rows_carry_each_groups_change(tiny_factory, family):
    """Logits of a batch whose rows carry three different changes equal each change applied on its own, and
    the generations equal greedy_generations with the edit applied (float64: tiny random models have ties)."""
    km = tiny_factory(family)
    km.model.double()
    changes = [_changes(km, seed) for seed in range(len(PROMPTS))]
    plans = [row_change_plan(km, _as_rows(c)) for c in changes]
    assert all(p is not None for p in plans)
    got = greedy_generations_changed(km, PROMPTS, plans, max_new_tokens=6)
    ids, mask = km.pad([torch.tensor(km.tokenizer(p)["input_ids"]) for group in PROMPTS for p in group])
    rows = [[0, 1], [2], [3, 4, 5]]
    with torch.no_grad(), rows_carry(km, plans, rows):
        carried = km.model(input_ids=ids, attention_mask=mask).logits
    for group, change, made, at in zip(PROMPTS, changes, got, rows):
        edit = commit(km, "trial", [], change)
        try:
            want = greedy_generations(km, group, max_new_tokens=6)
            with torch.no_grad():
                alone = km.model(input_ids=ids[at], attention_mask=mask[at]).logits
        finally:
            edit.revert()
        assert [g.token_ids for g in made] == [g.token_ids for g in want]
        real = mask[at].bool()
        torch.testing.assert_close(carried[at][real], alone[real], rtol=1e-9, atol=1e-9)
    # and the unchanged model is left as it was: no hook stays behind
    with torch.no_grad():
        plain = km.model(input_ids=ids, attention_mask=mask).logits
    assert not torch.allclose(plain[mask.bool()], carried[mask.bool()])
    assert [g.token_ids for g in greedy_generations(km, PROMPTS[0], 6)] != [] and all(
        not m._forward_hooks for m in km.model.modules())


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_change_plan_of_a_real_edit(tiny_factory, tmp_path, family):
    """A ROME edit (a rank-one change of a value projection: GPT-2's Conv1D, LLaMA's Linear) converts to a plan
    whose carried forward equals the edited model."""
    from kn_edit.editing.rome import RomeEditor
    from kn_edit.data.records import EditRequest
    from tiny_models import CORPUS

    km = tiny_factory(family)
    km.model.double()
    request = EditRequest(("The capital of France is",), "Paris", "Rome", subject="France")
    rome = RomeEditor(key_texts=CORPUS, layer=0, n_prefixes=2, prefix_length=3, steps=3, lr=0.5, clamp_norm_factor=1e4,
                      weight_decay=0.0, cache_dir=str(tmp_path / "cache"), fit_subject_start=False)
    ids, mask = km.pad([torch.tensor(km.tokenizer("The capital of France is")["input_ids"])])
    with torch.no_grad():
        unedited = km.model(input_ids=ids, attention_mask=mask).logits
    edit = rome.apply(km, [request])
    try:
        with torch.no_grad():
            want = km.model(input_ids=ids, attention_mask=mask).logits
    finally:
        edit.revert()
    assert (want - unedited).abs().max() > 1e-3  # the edit changed the answer's logits
    plan = change_plan(km, edit)
    assert plan is not None and plan
    with torch.no_grad(), rows_carry(km, [plan], [[0]]):
        got = km.model(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)


def test_parameters_no_linear_layer_owns_cannot_ride(tiny_factory):
    """An embedding (tied to the output head or not) or a norm is not a linear layer's alone: no plan."""
    km = tiny_factory("llama")
    for name, param in km.model.named_parameters():
        if "embed" in name or "norm" in name:
            change = RowChange(name, 0, torch.tensor([0]), torch.zeros_like(param.index_select(0, torch.tensor([0]))))
            assert row_change_plan(km, [change]) is None, name
    assert row_change_plan(km, []) == []


@pytest.mark.parametrize("batch_facts", [1, 3, 64])
def test_evaluation_generations_equal_each_edit_applied_alone(tiny_factory, tmp_path, batch_facts):
    """The evaluation's after-edit generations, made in batches whose rows carry their facts' edits (and the
    unedited ones, made in one batch), equal a plain loop: apply the edit, generate, revert."""
    from helpers import PASSAGES, ValueVectorEditor, tiny_config, tiny_facts
    from kn_edit.evaluation import evaluate
    from kn_edit.evaluation.datamodule import FactDataModule
    from kn_edit.evaluation.module import GENERATION_TEMPLATES

    km = tiny_factory("llama")
    km.model.double()
    config = tiny_config(tmp_path, **{"probe.enabled": False})
    config.fluency.enabled, config.fluency.prompts, config.fluency.samples = True, 2, 2
    config.fluency.max_new_tokens, config.fluency.batch_facts = 5, batch_facts
    editor = ValueVectorEditor(scale=5.0, fail_on=["Japan"])
    result = evaluate(config, km=km, editor=editor, facts=tiny_facts(), passages=PASSAGES, write=False)
    datamodule = FactDataModule(km, config.data, facts=tiny_facts())
    datamodule.setup("test")
    rows = {r["index"]: r for r in result.rows}
    assert len(rows) == len(datamodule.cases) > 3
    changed = 0
    for case in datamodule.cases:
        prompts = [t.format(case.fact.subject) for t in GENERATION_TEMPLATES[:2]]
        before = [g.text for g in greedy_generations(km, prompts, 5)]
        try:
            edit = editor.apply(km, list(case.requests))
        except Exception:  # refused: after = before
            after = before
        else:
            try:
                after = [g.text for g in greedy_generations(km, prompts, 5)]
            finally:
                edit.revert()
        samples = rows[case.index]["fluency"]["samples"]
        assert [s["before"] for s in samples] == before, case.fact.fact_id
        assert [s["after"] for s in samples] == after, case.fact.fact_id
        changed += after != before
    assert changed  # the edits moved some generations: the comparison is not of unedited texts alone


def test_a_change_too_large_to_wait_is_generated_with_the_edit_applied(tiny_factory, tmp_path, monkeypatch):
    """Where an edit's change is larger than the waiting budget, its generations are made at once (edit applied),
    with the same texts as carried rows give."""
    from helpers import PASSAGES, ValueVectorEditor, tiny_config, tiny_facts
    from kn_edit.evaluation import evaluate
    from kn_edit.evaluation import module as module_

    km = tiny_factory("llama")
    km.model.double()
    config = tiny_config(tmp_path, **{"probe.enabled": False})
    config.fluency.enabled, config.fluency.prompts, config.fluency.samples, config.fluency.max_new_tokens = True, 2, 2, 5
    editor = ValueVectorEditor(scale=5.0)
    carried = evaluate(config, km=km, editor=editor, facts=tiny_facts(), passages=PASSAGES, write=False)
    calls = []
    monkeypatch.setattr(module_, "_WAITING_BYTES", 0)
    monkeypatch.setattr(module_, "greedy_generations_changed", lambda *a, **k: calls.append(a) or [])
    at_once = evaluate(config, km=km, editor=editor, facts=tiny_facts(), passages=PASSAGES, write=False)
    assert not calls  # nothing waited for a batch
    for a, b in zip(carried.rows, at_once.rows):
        assert a["fluency"] == b["fluency"]
