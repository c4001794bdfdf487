"""The key-value editors' shortcuts (ROME, MEMIT, kn-subject) each give what the plain computation gives, on tiny
models: v* steps from the edited layer up only, with every row packed in one sequence, against each row's own
forward through every block (logits and δ's gradient) and against the steps as they were; the context prefixes
and key statistics kept on the model, against fresh ones, and dropped when the weights change (an edit applied, a
patch loaded, a write outside the ledger); C's kept factorization against a fresh solve."""

from __future__ import annotations

import pytest
import torch

import kn_edit
from kn_edit import EditError
from kn_edit.editing import EditRequest, SliceChange, commit
from kn_edit.editing.keyvalue import keys as keys_module
from kn_edit.editing.keyvalue import statistics as statistics_module
from kn_edit.editing.keyvalue import target as target_module
from kn_edit.editing.keyvalue.keys import context_prefixes, sample_prefixes
from kn_edit.editing.keyvalue.solve import least_change
from kn_edit.editing.keyvalue.statistics import key_statistics
from kn_edit.editing.keyvalue.target import _Steps, added_output, kl_row, optimise_value, rewrite_rows
from kn_edit.editing.ledger import weights_state
from kn_edit.editing.patchfile import apply_patch
from kn_edit.editing.rome import RomeEditor
from tiny_models import CORPUS, build_model

PROMPTS = ("The capital of France is", "Paris is the capital of France. The capital of France is")
REQUEST = EditRequest(prompts=PROMPTS, old="Paris", new="Rome", subject="France")
# (family, n_layers, sliding window): gemma3 with 7 layers has sliding and full attention layers; with a window of
# 4 tokens the rows do not fit in it and run group by group (still from the edited layer up)
MODELS = [("gpt2", 4, None), ("llama", 4, None), ("qwen2", 4, None), ("gpt_neox", 4, None), ("gptj", 4, None),
          ("gemma3", 7, 40), ("gemma3", 7, 4)]  # fmt: skip


def _km(family: str, n_layers: int, window: int | None = None, attention: str | None = None):
    model, tok = build_model(family, n_layers=n_layers, **({"sliding_window": window} if window else {}))
    if attention is not None:
        model.set_attn_implementation(attention)
    return kn_edit.wrap(model, tok, name=f"tiny-{family}")


def _rows(km, prompts=PROMPTS, subject="France"):
    rows = rewrite_rows(km, prompts, subject, "Rome", ["", "Hello there", "A b c d e f"]) + [kl_row(km, subject)]
    assert len({len(r.input_ids) - r.subject for r in rows}) > 1, "the rows must differ in length"
    return rows


def _plain(km, rows, wanted, layer: int, delta: torch.Tensor) -> torch.Tensor:
    """Logits at ``wanted`` (row, position): each row alone through the whole model, δ added at its subject."""
    out = []
    for i, p in wanted:
        row = rows[i]
        with added_output(km.value_proj(layer), torch.tensor([0]), torch.tensor([row.subject]), delta):
            out.append(km.model(input_ids=row.input_ids[None]).logits[0, p])
    return torch.stack(out)


@pytest.mark.parametrize("family,n_layers,window", MODELS)
def test_steps_from_the_edited_layer_up_equal_each_row_s_full_forward(family, n_layers, window):
    km = _km(family, n_layers, window)
    rows = _rows(km)
    # every position from the subject's last token on, in an order that is not the rows' own
    wanted = [(i, p) for i, r in enumerate(rows) for p in range(r.subject, len(r.input_ids))][::-1]
    calls = []
    handle = km.value_proj(0).register_forward_hook(lambda *_: calls.append(1))  # inside the first block
    try:
        for layer in range(1, n_layers):
            steps = _Steps(km, rows, wanted)
            assert (steps.plan is not None) == (window != 4)
            if steps.plan is not None:
                assert steps.plan.ids.shape == (1, sum(len(r.input_ids) - r.subject for r in rows)), "no padding"
            for k in range(2):  # the first step (which also runs every block once) and a later one
                delta = torch.randn(km.d_model, generator=torch.Generator().manual_seed(layer + k)).requires_grad_(True)
                calls.clear()
                got = steps.logits(km.value_proj(layer), delta)
                assert steps.skipping and (len(calls) > 0) == (k == 0), "the blocks below run in the first step only"
                plain = _plain(km, rows, wanted, layer, delta)
                assert torch.allclose(got, plain, atol=1e-5), (family, layer)
                grad = torch.autograd.grad(got.logsumexp(-1).sum(), [delta])[0]
                expected = torch.autograd.grad(plain.logsumexp(-1).sum(), [delta])[0]
                assert torch.allclose(grad, expected, rtol=1e-4, atol=1e-5 * float(expected.norm())), (family, layer)
    finally:
        handle.remove()


def test_packed_rows_with_eager_attention_and_a_subject_at_the_start():
    km = _km("gpt2", 3, attention="eager")
    rows = _rows(km, ("Paris is the capital of", "The capital of France is Paris, and Paris is in"), "Paris")
    assert min(r.subject for r in rows) == 0, "rows without a prefix (the subject starts them)"
    wanted = [(i, p) for i, r in enumerate(rows) for p in r.answer]
    steps = _Steps(km, rows, wanted)
    assert steps.plan.mask.dim() == 4 and steps.plan.mask.is_floating_point()
    delta = torch.randn(km.d_model, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(steps.logits(km.value_proj(2), delta), _plain(km, rows, wanted, 2, delta), atol=1e-5)
    assert steps.skipping
    # no row with a prefix: no cache at all
    rows = rewrite_rows(km, ("Paris is the capital of",), "Paris", "Rome", [""]) + [kl_row(km, "Paris")]
    wanted = [(i, p) for i, r in enumerate(rows) for p in r.answer]
    steps = _Steps(km, rows, wanted)
    assert steps.plan.cache is None
    with torch.no_grad():
        assert torch.allclose(steps.logits(km.value_proj(1), delta), _plain(km, rows, wanted, 1, delta), atol=1e-5)


def test_a_forward_the_skipping_gets_wrong_runs_every_block(monkeypatch):
    """The first skipping step is checked against the full forward: where they differ (here: a corrupted output of
    the blocks below), every step runs every block, with the plain logits."""
    km = _km("llama", 3)
    rows = _rows(km)
    wanted = [(i, p) for i, r in enumerate(rows) for p in r.answer]
    real = target_module._captured

    def corrupted(*args):
        below, logits = real(*args)
        below.output = below.output + 1.0
        return below, logits

    monkeypatch.setattr(target_module, "_captured", corrupted)
    steps = _Steps(km, rows, wanted)
    delta = torch.randn(km.d_model, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for _ in range(2):
            assert torch.allclose(steps.logits(km.value_proj(1), delta), _plain(km, rows, wanted, 1, delta), atol=1e-5)
    assert not steps.skipping


@pytest.mark.parametrize("family,n_layers,window", [("gpt2", 3, None), ("llama", 3, None), ("gemma3", 7, 40)])
def test_v_star_from_the_upper_layers_equals_v_star_from_the_full_model(family, n_layers, window):
    """The same optimisation, step for step: packed rows from the edited layer up against one forward per group of
    rows through every block (the steps as they were)."""
    km = _km(family, n_layers, window)
    rows = _rows(km)[:-1]
    kl = kl_row(km, "France")
    settings = dict(lr=0.5, steps=6, stop_loss=0.0, kl_factor=0.5, weight_decay=0.1, clamp_norm_factor=1e4)
    for layer in (1, n_layers - 1):
        new = optimise_value(km, layer, rows, kl, 1.0, **settings)
        old = optimise_value(km, layer, rows, kl, 1.0, padded=False, upper=False, **settings)
        assert len(new.losses) == len(old.losses) == 6
        assert torch.allclose(torch.tensor(new.losses), torch.tensor(old.losses), rtol=1e-4, atol=1e-6)
        assert torch.allclose(new.delta, old.delta, rtol=1e-4, atol=1e-5 * float(old.delta.norm()))
        assert new.kl[0] == 0.0  # the reference is the first step's own distribution (δ = 0 there)
    # ... which is the unedited model's next-token distribution after "{subject} is a"
    steps = _Steps(km, rows + [kl], [(len(rows), kl.answer[0])])
    with torch.no_grad():
        first = steps.logits(km.value_proj(1), torch.zeros(km.d_model))[0]
        alone = km.model(input_ids=kl.input_ids[None]).logits[0, kl.answer[0]]
    assert torch.allclose(first, alone, atol=1e-5)


def _count_sampling(monkeypatch) -> list[int]:
    calls: list[int] = []
    real = keys_module.sample_prefixes
    monkeypatch.setattr(keys_module, "sample_prefixes", lambda *a, **k: calls.append(1) or real(*a, **k))
    return calls


def _with_added_tokens():
    """A tiny LLaMA whose tokenizer has an added control token that is not marked special (as Gemma 3's
    ``<start_of_image>``) and an added whitespace token (as its ``"\\n\\n"``), and whose head has 3 rows past the
    tokenizer's vocabulary (padding): (KnModel, control id, whitespace id)."""
    import copy

    model, tok = build_model("llama")
    tok = copy.deepcopy(tok)  # the tiny tokenizer is shared between tests
    tok.add_tokens(["<start_of_image>", "\n\n"])
    model.resize_token_embeddings(len(tok) + 3)
    return kn_edit.wrap(model, tok, name="tiny-llama-added"), tok.convert_tokens_to_ids("<start_of_image>"), \
        tok.convert_tokens_to_ids("\n\n")


def test_control_tokens_are_the_special_added_and_padding_ids():
    km, control, whitespace = _with_added_tokens()
    vocab = km.model.get_output_embeddings().weight.shape[0]
    banned = keys_module.control_tokens(km.tokenizer, vocab).tolist()
    special = km.tokenizer.convert_tokens_to_ids("<|endoftext|>")
    assert banned == sorted([special, control, vocab - 3, vocab - 2, vocab - 1])
    assert whitespace not in banned


def test_context_prefixes_never_hold_a_control_token(monkeypatch):
    """Where the control tokens are the model's most likely next tokens, the prefixes are the ones sampled from
    the same model with those tokens' logits at −∞ (the plain computation), and none of them holds one."""
    km, control, _ = _with_added_tokens()
    head = km.model.get_output_embeddings()
    vocab = head.weight.shape[0]
    special = km.tokenizer.convert_tokens_to_ids("<|endoftext|>")
    favoured = torch.tensor([special, control, vocab - 1])

    def set_to(value: float):
        def hook(_module, _args, out):
            out = out.clone()
            out[..., favoured] = value
            return out
        return head.register_forward_hook(hook)

    handle = set_to(1e4)
    try:
        got = sample_prefixes(km, 4, 5)
    finally:
        handle.remove()
    # the plain computation: the same sampling loop where those tokens can never be drawn
    monkeypatch.setattr(keys_module, "control_tokens", lambda tokenizer, n: torch.zeros(0, dtype=torch.long))
    handle = set_to(-float("inf"))
    try:
        reference = sample_prefixes(km, 4, 5)
    finally:
        handle.remove()
    assert got == reference and len(got) == 5 and got[0] == ""
    assert all(text and "<start_of_image>" not in text for text in got[1:])
    assert all(control not in km.tokenizer(text)["input_ids"] for text in got)


def test_context_prefixes_are_kept_until_the_weights_change(tiny_factory, tmp_path, monkeypatch):
    km = tiny_factory("llama")
    calls = _count_sampling(monkeypatch)
    first = context_prefixes(km, 3, 4)
    assert len(calls) == 1 and first == sample_prefixes(km, 3, 4) and len(first) == 4
    assert context_prefixes(km, 3, 4) == first and len(calls) == 1  # kept
    assert context_prefixes(km, 3, 4, seed=1) == sample_prefixes(km, 3, 4, seed=1) and len(calls) == 2  # per settings
    assert context_prefixes(km, 3, 4) == first and len(calls) == 2

    # an edit applied: sampled again, from the edited model
    name = "model.layers.0.mlp.down_proj.weight"
    weight = km.model.get_parameter(name)
    edit = commit(km, "test", [], [SliceChange(name, 1, torch.arange(8), 5.0 * torch.randn(weight.shape[0], 8))])
    edited = context_prefixes(km, 3, 4)
    assert len(calls) == 3 and edited == sample_prefixes(km, 3, 4)
    assert context_prefixes(km, 3, 4) == edited and len(calls) == 3
    edit.save(tmp_path / "edit.knpatch")
    edit.revert()  # back to the first weights, bit for bit
    assert context_prefixes(km, 3, 4) == first and len(calls) == 4
    assert context_prefixes(km, 3, 4) == first and len(calls) == 4

    # a patch loaded
    patch = apply_patch(km, tmp_path / "edit.knpatch")
    assert context_prefixes(km, 3, 4) == edited and len(calls) == 5
    patch.revert()
    assert context_prefixes(km, 3, 4) == first and len(calls) == 6

    # a write outside the ledger, and another tokenizer
    with torch.no_grad():
        weight.mul_(1.5)
    assert context_prefixes(km, 3, 4) == sample_prefixes(km, 3, 4) and len(calls) == 7
    with torch.no_grad():
        weight.div_(1.5)
    km.tokenizer = type(km.tokenizer)(tokenizer_object=km.tokenizer.backend_tokenizer, eos_token="<|endoftext|>",
                                      bos_token="<|endoftext|>")
    context_prefixes(km, 3, 4)
    assert len(calls) == 8


def test_an_edit_applied_and_reverted_comes_back_to_the_same_weights_state(tiny_factory, tmp_path):
    km = tiny_factory("gpt2")  # a tied head: one weight under two names
    before = weights_state(km)
    edit = RomeEditor(key_texts=CORPUS, layer=0, n_prefixes=1, prefix_length=2, steps=2,
                      cache_dir=str(tmp_path)).apply(km, [REQUEST])
    assert weights_state(km) != before
    edit.revert()
    assert weights_state(km) == before


def test_key_statistics_are_kept_until_the_weights_below_change(tiny_factory, tmp_path, monkeypatch):
    km = tiny_factory("llama", n_layers=3)
    reads = []
    real = statistics_module.cache_path
    monkeypatch.setattr(statistics_module, "cache_path", lambda *a: reads.append(1) or real(*a))
    first = key_statistics(km, 1, CORPUS, cache_dir=tmp_path)
    assert not first.from_cache and len(reads) == 1
    again = key_statistics(km, 1, CORPUS, cache_dir=tmp_path)
    assert again.from_cache and len(reads) == 1 and torch.equal(again.mom2, first.mom2)
    assert again.memo is first.memo  # what is derived from C is made once
    name = "model.layers.0.mlp.down_proj.weight"
    weight = km.model.get_parameter(name)
    edit = commit(km, "test", [], [SliceChange(name, 1, torch.arange(8), 5.0 * torch.randn(weight.shape[0], 8))])
    edited = key_statistics(km, 1, CORPUS, cache_dir=tmp_path)
    assert not edited.from_cache and len(reads) == 2 and not torch.equal(edited.mom2, first.mom2)
    edit.revert()
    assert torch.equal(key_statistics(km, 1, CORPUS, cache_dir=tmp_path).mom2, first.mom2)
    # without the disk cache nothing is kept either
    assert not key_statistics(km, 1, CORPUS, cache=False).from_cache
    assert not key_statistics(km, 1, CORPUS, cache=False).from_cache


@pytest.mark.parametrize("ridge,softness", [(0.0, 0.0), (0.1, 0.0), (0.0, 0.5)])
def test_the_kept_factorization_gives_the_solve_s_numbers(ridge, softness):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(200, 24, generator=g, dtype=torch.float64)
    mom2, keys, targets = (x.T @ x / 200).float(), torch.randn(3, 24, generator=g), torch.randn(3, 5, generator=g)
    factors: dict = {}
    for _ in range(2):  # made, then reused
        kept = least_change(mom2, keys, targets, ridge, softness=softness, factors=factors)
        assert torch.equal(kept, least_change(mom2, keys, targets, ridge, softness=softness))
    assert list(factors) == [("lu", ridge)]
    with pytest.raises(EditError, match="singular"):
        least_change(torch.zeros(24, 24), keys, targets, factors={})
