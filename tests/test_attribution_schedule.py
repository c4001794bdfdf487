"""The attribution's pass schedules against the slow per-layer reference (tests/reference_attribution.py): the
triangular pass (one step per pass, each layer's rows joining at their own block), a step cut into pieces, and
several whole steps packed into one pass; every prompt of a fact in one call against one call per prompt.

Tolerance: max |got − ref| ≤ 1e-6 · max |ref| (float32 round-off; the scores of the tiny models are ~1e-5).
"""

from __future__ import annotations

import pytest
import torch

import kn_edit
from kn_edit.locating.attribution import _passes
from reference_attribution import reference_attribute, reference_step

STEPS = 4
LAYERS = 3


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def assert_equal_to_1e6(got: torch.Tensor, ref: torch.Tensor) -> None:
    scale = float(ref.abs().max())
    assert scale > 0, "reference scores are all zero: the comparison would prove nothing"
    assert got.shape == ref.shape
    assert float((got - ref).abs().max()) <= 1e-6 * scale


def fact(family: str) -> tuple[list[str], str]:
    """Prompts of different lengths (separate groups) and a two-token target (two answer steps per prompt)."""
    if family == "bert":
        return ["The capital of France is [MASK].", "[MASK] is the capital of France."], "paris france"
    return ["The capital of France is", "The Eiffel Tower is in"], "Paris France"


# rows per pass, with 3 layers and m = 4 (12 rows per step): one whole step per pass, a step cut into pieces
# that split layers, and several whole steps packed into one pass
SCHEDULES = {"step-per-pass": 12, "pieces": 5, "packed": 24}


@pytest.mark.parametrize("schedule", list(SCHEDULES))
@pytest.mark.parametrize("family", ["gpt2", "llama", "bert"])
def test_schedules_equal_the_reference(tiny_factory, family, schedule):
    km = tiny_factory(family, n_layers=LAYERS)
    prompts, target = fact(family)
    assert all(len(km.encode(p, target).steps) == 2 for p in prompts)
    together = kn_edit.attribute_prompts(km, prompts, target, steps=STEPS, batch_size=SCHEDULES[schedule])
    for i, prompt in enumerate(prompts):
        ref = reference_attribute(km, prompt, target, steps=STEPS)
        assert_equal_to_1e6(together[i], ref)
        alone = kn_edit.attribute(km, prompt, target, steps=STEPS, batch_size=SCHEDULES[schedule])
        assert_equal_to_1e6(together[i], alone)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_full_sequence_passes_equal_the_reference(tiny_factory, family):
    km = tiny_factory(family, n_layers=LAYERS)
    prompts, target = fact(family)
    for batch_size in SCHEDULES.values():
        got = kn_edit.attribute_prompts(km, prompts, target, steps=STEPS, batch_size=batch_size, prefix_cache=False)
        for i, prompt in enumerate(prompts):
            assert_equal_to_1e6(got[i], reference_attribute(km, prompt, target, steps=STEPS))


@pytest.mark.parametrize("family", ["gpt2", "llama", "bert"])
def test_scored_positions_equal_the_reference(tiny_factory, family):
    # kn-subject scores the subject's tokens: the full-sequence pass with another scored position per step
    km = tiny_factory(family, n_layers=LAYERS)
    prompts, target = fact(family)
    step = km.encode(prompts[0], target).steps[0]
    at = [1, 2, step.position]
    for batch_size in SCHEDULES.values():
        got = kn_edit.attribute_steps(km, [step] * len(at), STEPS, batch_size=batch_size, positions=at)
        for row, p in zip(got, at):
            ref = torch.stack([reference_step(km, step, layer, STEPS, at=p) for layer in range(LAYERS)])
            assert_equal_to_1e6(row, ref)


def test_layers_in_any_order(tiny_factory):
    km = tiny_factory("llama", n_layers=4)
    prompts, target = fact("llama")
    got = kn_edit.attribute(km, prompts[0], target, steps=STEPS, layers=[3, 0, 2], batch_size=5)
    assert_equal_to_1e6(got, reference_attribute(km, prompts[0], target, steps=STEPS, layers=[3, 0, 2]))


@pytest.mark.parametrize("prefix_cache", [True, False])
def test_no_row_runs_below_its_layer(tiny_factory, prefix_cache):
    # One step per pass, layers 1 and 3 of 4: block 0 runs the clean row alone, blocks 1-2 it and layer 1's m
    # rows, block 3 all of them (rows counted at the blocks' outputs); on the full-sequence pass too.
    km = tiny_factory("llama", n_layers=4)
    prompts, target = fact("llama")
    step = km.encode(prompts[0], target).steps[0]
    seen = []

    def batch_size(_module, _args, output):
        seen.append((output[0] if isinstance(output, tuple) else output).shape[0])

    handles = [b.register_forward_hook(batch_size) for b in km.model.model.layers]
    try:
        kn_edit.attribute_steps(km, [step], STEPS, layers=[3, 1], batch_size=2 * STEPS, prefix_cache=prefix_cache)
    finally:
        for h in handles:
            h.remove()
    assert seen[-4:] == [1, 1 + STEPS, 1 + STEPS, 1 + 2 * STEPS]


@pytest.mark.parametrize("n_steps, per_step, max_rows", [(3, 12, 5), (3, 12, 12), (3, 12, 24), (5, 12, 36), (1, 600, 200),
                                                          (2, 600, 128), (7, 20, 128)])
def test_passes_cover_every_row_once_and_never_mix_a_partial_step(n_steps, per_step, max_rows):
    passes = _passes(n_steps, per_step, max_rows)
    rows = [r for start, end in passes for r in range(start, end)]
    assert rows == list(range(n_steps * per_step))
    for start, end in passes:
        assert end - start <= max(max_rows, 1)
        steps = {r // per_step for r in range(start, end)}
        if len(steps) > 1:  # packed: whole steps only
            assert start % per_step == 0 and end % per_step == 0
