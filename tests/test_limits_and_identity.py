"""Token limits (configurable, and the model's context), progress for one request, and the attribution cache's
model identity as a real digest of the weights."""

from __future__ import annotations

import hashlib
from contextlib import contextmanager

import pytest
import torch

import kn_edit
from kn_edit import Neuron, PromptError, TargetError
from kn_edit.locating.dataset import model_identity, weights_digest
from kn_edit.progress import track
from kn_edit.models.prompts import DEFAULT_MAX_TOKENS, max_tokens, token_limit
from tiny_models import prompt_for, tiny_km


# ----- limits ---------------------------------------------------------------------------------------------
def test_prompts_and_targets_beyond_the_limit_are_refused(tiny_factory):
    km = tiny_factory("gpt2")
    prompt, target = prompt_for("gpt2")
    n = len(km.encode(prompt, target).steps[0].input_ids)
    with token_limit(n - 1):
        with pytest.raises(PromptError, match=rf"is {n} tokens long, above the limit of {n - 1}; raise the limit"):
            km.encode(prompt, target)
        with pytest.raises(PromptError, match="above the limit"):
            km.predict(prompt)
    with token_limit(1):
        with pytest.raises((PromptError, TargetError), match="--max-tokens N"):
            km.encode(prompt, target)
    assert max_tokens() == DEFAULT_MAX_TOKENS
    with pytest.raises(TargetError, match="target"):
        km.encode(prompt, " x" * (DEFAULT_MAX_TOKENS + 1))


@pytest.mark.parametrize("family", ["gpt2", "llama", "bert"])
def test_prompts_beyond_the_models_context_are_refused(tiny_factory, family):
    km = tiny_factory(family)
    context = km.model.config.max_position_embeddings  # 64 in the tiny models
    prompt, target = prompt_for(family)
    long = "word " * context + prompt
    with token_limit(10 * context), pytest.raises(PromptError, match=f"more than the model's context of {context}"):
        km.encode(long, target)
    km.encode(prompt, target)  # short prompts still fit


def test_max_tokens_option_raises_the_limit(tiny_factory, tmp_path, capsys):
    from kn_edit.cli import main

    km = tiny_factory("gpt2")
    saved = km.save(tmp_path / "m")
    from kn_edit.cli.edit import DEFAULT_CONTROLS

    prompt = "Far from Tokyo, the Eiffel Tower, gold and Einstein: the capital of France is"
    n = len(km.encode(prompt, "Paris").steps[0].input_ids)  # the prompt's tokens
    assert all(len(km.encode(c, "Paris").steps[-1].input_ids) < n for c in DEFAULT_CONTROLS) and n < 64
    argv = ["erase-fact", "-m", str(saved), "-p", prompt, "-t", "Paris", "--force", "--neurons", "1:5", "--quiet"]
    assert main(["--max-tokens", str(n - 1), *argv]) == 2
    assert f"above the limit of {n - 1}" in capsys.readouterr().err
    with token_limit(n - 1):
        assert main(["--max-tokens", str(n), *argv]) == 0  # the option wins within the command
    assert max_tokens() == DEFAULT_MAX_TOKENS


# ----- progress -------------------------------------------------------------------------------------------
class Recorder:
    def __init__(self):
        self.tasks: list[dict] = []

    @contextmanager
    def task(self, description, total=None):
        record = {"description": description, "total": total, "advanced": 0, "closed": False}
        self.tasks.append(record)

        class T:
            def advance(self, amount=1.0):
                record["advanced"] += amount

        try:
            yield T()
        finally:
            record["closed"] = True


def test_track_ends_its_task_when_the_loop_is_left_early():
    rec = Recorder()

    def first_over(limit):
        for i in track(rec, range(10), "counting"):
            if i > limit:
                return i

    assert first_over(2) == 3
    assert rec.tasks == [{"description": "counting", "total": 10, "advanced": 4, "closed": True}]


def test_one_request_shows_progress_of_the_solve_steps():
    km = tiny_km("llama")
    rec = Recorder()
    prompt, old = prompt_for("llama")
    edit = kn_edit.update_fact(km, [prompt], old, "Rome", neurons=[Neuron(1, 5), Neuron(1, 7)], force=True,
                               solve_steps=3, on_failure="apply", reporter=rec)
    edit.revert()
    steps = [t for t in rec.tasks if t["description"].startswith("least change for 'Rome'")]
    assert steps and steps[0]["total"] == 4 and steps[0]["advanced"] >= 1 and all(t["closed"] for t in rec.tasks)


# ----- the attribution cache's model identity -------------------------------------------------------------
def reference_digest(km) -> str:
    """The same digest, written plainly: value projections, the input embeddings, the unembedding if untied."""
    h = hashlib.sha256()
    tensors = [km.value_weight(l) for l in range(km.n_layers)] + [km.model.get_input_embeddings().weight]
    if not km.embeddings_tied:
        tensors.append(km.model.get_output_embeddings().weight)
    for i, t in enumerate(tensors):  # named by position: kn_edit.storage.digest's "name;dtype;shape;" header
        h.update(f"{i};{t.dtype};{tuple(t.shape)};".encode())
        h.update(t.detach().contiguous().numpy().tobytes())
    return h.hexdigest()


def test_weights_digest_matches_a_plain_reference():
    km = tiny_km("gpt2")
    assert km.embeddings_tied
    assert weights_digest(km) == reference_digest(km)


@pytest.mark.parametrize("change", ["permute", "sign-flip"])
def test_identity_sees_changes_that_keep_every_sum(change):
    km = tiny_km("gpt2")
    before = model_identity(km)
    vectors = km.value_vectors(1)
    with torch.no_grad():
        if change == "permute":
            vectors[[3, 5]] = vectors[[5, 3]].clone()  # sums of |w| and w² unchanged
        else:
            vectors[3] = -vectors[3]
    assert model_identity(km) != before
    assert model_identity(km)["weights"] == reference_digest(km)


def test_identity_is_cached_until_the_weights_change():
    km = tiny_km("llama")
    first = weights_digest(km)
    cached = km.model.__dict__["_kn_edit_weights_digest"]
    assert weights_digest(km) == first and km.model.__dict__["_kn_edit_weights_digest"] is cached
    prompt, old = prompt_for("llama")
    edit = kn_edit.erase_fact(km, [prompt], old, neurons=[Neuron(1, 5)], force=True)  # through the ledger
    assert weights_digest(km) != first and weights_digest(km) == reference_digest(km)
    edit.revert()
    assert weights_digest(km) == first
