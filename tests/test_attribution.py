"""kn_edit.attribute against a slow per-layer reference of the KN_METHOD.md formula, on every family.

Tolerance: ``torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5 * max|ref|)``. The tiny random
models are nearly uniform over their vocabulary, so scores are ~1e-5 and an absolute 1e-7 would be loose;
scaling atol by the largest score keeps the check at the 1e-5-relative level (about 1e-10 absolute here).
Observed differences are ~4e-7 of max|ref|, i.e. float32 round-off.
"""

from __future__ import annotations

import pytest
import torch

import kn_edit
from helpers import assert_same, hook_count, snapshot
from kn_edit import ConfigError, PromptError, TargetError
from reference_attribution import probability_with, reference_attribute
from tiny_models import prompt_for

@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models are dominated by per-op overhead; with 2 threads on a busy 2-core machine OpenMP's
    hand-offs make each forward ~100x slower. Restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


STEPS = 4  # m for the reference comparisons: the formula's structure, not its accuracy, is under test


def assert_scores_close(got: torch.Tensor, ref: torch.Tensor) -> None:
    assert got.dtype == torch.float32 and got.device.type == "cpu"
    assert got.shape == ref.shape
    scale = float(ref.abs().max())
    assert scale > 0, "reference scores are all zero: the comparison would prove nothing"
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5 * scale)


def multi_token_target(km, prompt: str) -> str:
    target = "Paris France" if not km.is_masked_lm else "paris france"
    assert len(km.encode(prompt, target).steps) > 1
    return target


@pytest.mark.parametrize("prefix_cache", [None, False], ids=["auto", "full-sequence"])
def test_matches_reference_single_token(tiny, prefix_cache):
    if prefix_cache is False and tiny.is_masked_lm:
        pytest.skip("a masked LM always takes the full-sequence path")
    prompt, target = prompt_for(tiny.adapter.family)
    assert len(tiny.encode(prompt, target).steps) == 1
    got = kn_edit.attribute(tiny, prompt, target, steps=STEPS, prefix_cache=prefix_cache)
    assert got.shape == (tiny.n_layers, tiny.d_ff)
    assert_scores_close(got, reference_attribute(tiny, prompt, target, steps=STEPS))


def test_matches_reference_multi_token(tiny):
    prompt, _ = prompt_for(tiny.adapter.family)
    target = multi_token_target(tiny, prompt)
    got = kn_edit.attribute(tiny, prompt, target, steps=STEPS)
    assert_scores_close(got, reference_attribute(tiny, prompt, target, steps=STEPS))


def test_layer_subset_in_given_order(tiny_factory):
    km = tiny_factory("llama", n_layers=3)
    prompt, target = prompt_for("llama")
    got = kn_edit.attribute(km, prompt, target, steps=STEPS, layers=[2, 0])
    assert got.shape == (2, km.d_ff)
    assert_scores_close(got, reference_attribute(km, prompt, target, steps=STEPS, layers=[2, 0]))


@pytest.mark.parametrize("family", ["gpt2", "llama", "mistral", "qwen2", "gemma3", "gpt_neox", "gptj"])
def test_one_layer_band_per_pass(tiny_factory, family):
    # batch_size = m: each pass holds one layer's rows, so the clean row is computed once and copied into the
    # rows at that layer's block (the cached path's band split), for every causal family.
    km = tiny_factory(family, n_layers=3)
    prompt, target = prompt_for(family)
    got = kn_edit.attribute(km, prompt, target, steps=STEPS, batch_size=STEPS)
    assert_scores_close(got, reference_attribute(km, prompt, target, steps=STEPS))


def test_same_length_steps_share_passes(tiny_factory):
    # Two answer steps of equal length form one group; passes of 6 rows straddle the steps (no band split).
    km = tiny_factory("llama")
    prompt, target = prompt_for("llama")
    step = km.encode(prompt, target).steps[0]
    other = km.encode("The capital of Italy is", "Rome").steps[0]
    assert len(other.input_ids) == len(step.input_ids)
    got = kn_edit.attribute_steps(km, [step, other], steps=STEPS, batch_size=6)
    assert got.shape == (2, km.n_layers, km.d_ff)
    assert_scores_close(got[0], reference_attribute(km, prompt, target, steps=STEPS))
    assert_scores_close(got[1], reference_attribute(km, "The capital of Italy is", "Rome", steps=STEPS))


def test_gemma3_cache_beyond_sliding_window(tiny_factory):
    # Six layers: Gemma 3's pattern gives sliding-window layers and one global layer; the prompt is longer
    # than the window, so the cached prefix is already truncated to the window.
    km = tiny_factory("gemma3", n_layers=6)
    layer_types = km.model.config.layer_types
    assert "sliding_attention" in layer_types and "full_attention" in layer_types
    prompt, target = "The capital of France is Paris. The capital of Italy is", "Rome"
    assert len(km.encode(prompt, target).steps[0].input_ids) > km.model.config.sliding_window + 2
    got = kn_edit.attribute(km, prompt, target, steps=STEPS, prefix_cache=True)
    assert_scores_close(got, reference_attribute(km, prompt, target, steps=STEPS))


@pytest.mark.parametrize("family", ["gpt2", "bert"])
def test_prompts_batch_like_single_calls(tiny_factory, family):
    km = tiny_factory(family)
    if family == "bert":
        prompts = ["The capital of France is [MASK].", "[MASK] is the capital of France.", "France has [MASK]."]
        target = "paris"
    else:
        prompts = ["The capital of France is", "Paris is the capital of", "The Eiffel Tower is in"]
        target = "Paris"
    # Chunks of 5 rows split layers and steps across passes; prompts of different lengths form groups.
    together = kn_edit.attribute_prompts(km, prompts, target, steps=STEPS, batch_size=5)
    assert together.shape == (3, km.n_layers, km.d_ff)
    for i, p in enumerate(prompts):
        assert_scores_close(together[i], reference_attribute(km, p, target, steps=STEPS))


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_completeness(tiny_factory, family):
    """Sum over neurons of Attr_l equals P(y) - P(y | a_l[t] := 0) up to the Riemann error (IG's completeness).
    Gradient x input at the baseline (m = 1) misses it by percents, so the tolerance is meaningful."""
    km = tiny_factory(family)
    prompt, target = prompt_for(family)
    step = km.encode(prompt, target).steps[0]
    delta = torch.tensor(
        dtype=torch.float64, data=[probability_with(km, step, l, 1.0) - probability_with(km, step, l, 0.0) for l in range(km.n_layers)]
    )
    assert (delta.abs() > 0).all()
    ig = kn_edit.attribute(km, prompt, target, steps=200).sum(dim=-1).double()
    torch.testing.assert_close(ig, delta, rtol=2e-3, atol=0.0)
    at_baseline = kn_edit.attribute(km, prompt, target, steps=1).sum(dim=-1).double()
    with pytest.raises(AssertionError):
        torch.testing.assert_close(at_baseline, delta, rtol=2e-3, atol=0.0)


def test_leaves_model_and_hooks_untouched(tiny_factory):
    km = tiny_factory("gptj")
    before = snapshot(km)
    kn_edit.attribute(km, *prompt_for("gptj"), steps=2)
    assert hook_count(km) == 0
    assert_same(km, before)
    assert all(p.grad is None for p in km.model.parameters())


def test_hooks_removed_after_exception(tiny_factory):
    km = tiny_factory("llama")
    assert hook_count(km) == 0

    def boom(_module, _args, _output):
        raise RuntimeError("boom")

    handle = km.value_proj(1).register_forward_hook(boom)
    try:
        with pytest.raises(RuntimeError, match="boom"):
            kn_edit.attribute(km, *prompt_for("llama"), steps=2)
    finally:
        handle.remove()
    assert hook_count(km) == 0


def test_works_under_inference_mode(tiny_factory):
    km = tiny_factory("qwen2")
    prompt, target = prompt_for("qwen2")
    plain = kn_edit.attribute(km, prompt, target, steps=STEPS)
    with torch.inference_mode():
        inside = kn_edit.attribute(km, prompt, target, steps=STEPS)
    torch.testing.assert_close(inside, plain, rtol=0, atol=0)


@pytest.mark.parametrize(
    "kwargs, error",
    [
        ({"steps": 0}, ConfigError),
        ({"steps": -3}, ConfigError),
        ({"steps": 2.5}, ConfigError),
        ({"layers": [2]}, ConfigError),
        ({"layers": [-1]}, ConfigError),
        ({"layers": []}, ConfigError),
        ({"layers": [0, 0]}, ConfigError),
        ({"batch_size": 0}, ConfigError),
        ({"prompt": "   "}, PromptError),
        ({"target": ""}, TargetError),
    ],
)
def test_bad_input(tiny_factory, kwargs, error):
    km = tiny_factory("gpt2")
    prompt, target = prompt_for("gpt2")
    args = {"prompt": prompt, "target": target, "steps": 2, **kwargs}
    with pytest.raises(error):
        kn_edit.attribute(km, **args)


def test_bad_input_masked_lm(tiny_factory):
    km = tiny_factory("bert")
    prompt, _ = prompt_for("bert")
    with pytest.raises(TargetError):
        kn_edit.attribute(km, prompt, "東京", steps=2)
    with pytest.raises(ConfigError):
        kn_edit.attribute(km, prompt, "paris", steps=2, prefix_cache=True)
    with pytest.raises(PromptError):
        kn_edit.attribute_prompts(km, [], "paris", steps=2)
    with pytest.raises(PromptError):
        kn_edit.attribute_prompts(km, "The capital of France is [MASK].", "paris", steps=2)


@pytest.mark.integration
def test_smollm2_cache_path_equals_full_sequence(smollm2):
    prompt, target = "The capital of France is", "Paris"
    layers = [0, 15, 29]
    cached = kn_edit.attribute(smollm2, prompt, target, steps=STEPS, layers=layers, prefix_cache=True)
    full = kn_edit.attribute(smollm2, prompt, target, steps=STEPS, layers=layers, prefix_cache=False)
    torch.testing.assert_close(cached, full, rtol=1e-4, atol=1e-5 * float(full.abs().max()))
    assert float(cached.abs().max()) > 1e-3  # a real model gives real scores
