"""Adapters find the right modules in every family, and the hooked activation is the value projection's input."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import kn_edit
from helpers import hook_count
from kn_edit.models.adapters import find_adapter
from kn_edit.models.hooks import value_input_hooks
from tiny_models import build_model

EXPECTED_VALUE_PROJ = {
    "bert": "bert.encoder.layer.{l}.output.dense",
    "gpt2": "transformer.h.{l}.mlp.c_proj",
    "llama": "model.layers.{l}.mlp.down_proj",
    "mistral": "model.layers.{l}.mlp.down_proj",
    "qwen2": "model.layers.{l}.mlp.down_proj",
    "gemma3": "model.layers.{l}.mlp.down_proj",
    "gpt_neox": "gpt_neox.layers.{l}.mlp.dense_4h_to_h",
    "gptj": "transformer.h.{l}.mlp.fc_out",
}
EXPECTED_EMBEDDINGS = {
    "bert": "bert.embeddings.word_embeddings",
    "gpt2": "transformer.wte",
    "llama": "model.embed_tokens",
    "mistral": "model.embed_tokens",
    "qwen2": "model.embed_tokens",
    "gemma3": "model.embed_tokens",
    "gpt_neox": "gpt_neox.embed_in",
    "gptj": "transformer.wte",
}


def _family(km) -> str:
    return km.name.removeprefix("tiny-")


def test_value_projection_and_embeddings_are_the_documented_modules(tiny):
    family = _family(tiny)
    for layer in range(tiny.n_layers):
        expected = tiny.model.get_submodule(EXPECTED_VALUE_PROJ[family].format(l=layer))
        assert tiny.value_proj(layer) is expected
    assert tiny._embeddings is tiny.model.get_submodule(EXPECTED_EMBEDDINGS[family])
    assert tiny.n_layers == 2 and tiny.d_ff == 64 and tiny.d_model == 32


def test_value_vectors_have_d_model_entries_and_alias_the_weight(tiny):
    vectors = tiny.value_vectors(1)
    assert vectors.shape == (tiny.d_ff, tiny.d_model)
    assert vectors.data_ptr() == tiny.value_weight(1).data_ptr()
    with torch.no_grad():
        vectors[3].add_(1.0)
    # The change is exactly the neuron-3 value vector of the weight, in the family's orientation.
    w = tiny.value_weight(1)
    column = w[3] if tiny.adapter.value_weight_transposed else w[:, 3]
    assert torch.equal(column, vectors[3])


def test_hooked_activation_is_the_value_projection_input(tiny):
    """Recompute each value projection's output from the captured activation: it must match exactly."""
    prompt, target = ("The capital of France is [MASK].", "paris") if tiny.is_masked_lm else ("The capital of France is", "Paris")
    step = tiny.encode(prompt, target).steps[0]
    ids, mask = tiny.pad([step.input_ids])
    captured_in: dict[int, torch.Tensor] = {}
    captured_out: dict[int, torch.Tensor] = {}

    def keep(layer, act):
        captured_in[layer] = act.detach().clone()

    handles = [
        tiny.value_proj(l).register_forward_hook(lambda m, a, out, l=l: captured_out.__setitem__(l, out.detach().clone()))
        for l in range(tiny.n_layers)
    ]
    try:
        with torch.no_grad(), value_input_hooks(tiny.value_projs(), keep):
            tiny.model(input_ids=ids, attention_mask=mask)
    finally:
        for h in handles:
            h.remove()
    for l in range(tiny.n_layers):
        act = captured_in[l]
        assert act.shape[-1] == tiny.d_ff
        vectors = tiny.value_vectors(l)  # [d_ff, d_model]
        bias = getattr(tiny.value_proj(l), "bias", None)
        recomputed = act @ vectors + (bias if bias is not None else 0)
        torch.testing.assert_close(recomputed, captured_out[l], rtol=1e-5, atol=1e-6)


def test_activations_match_hook_capture(tiny):
    """KnModel.activations (batched, padded) equals the value projection's input captured by a plain forward
    pre-hook on the documented module, one prompt at a time, at the answer position."""
    family = tiny.adapter.family if tiny.adapter.family in EXPECTED_VALUE_PROJ else tiny.model.config.model_type
    if tiny.is_masked_lm:
        pairs = [("The capital of [MASK] is Paris.", "france"), ("[MASK] is a country.", "france")]
    else:
        pairs = [("The capital of France is", "Paris"), ("Rome", "Italy")]  # different lengths: padding is exercised
    steps = [s for prompt, target in pairs for s in tiny.encode(prompt, target).steps]
    acts = tiny.activations(steps)
    assert acts.shape == (len(steps), tiny.n_layers, tiny.d_ff)
    for layer in range(tiny.n_layers):
        module = tiny.model.get_submodule(EXPECTED_VALUE_PROJ[family].format(l=layer))
        for j, step in enumerate(steps):
            seen = {}
            handle = module.register_forward_pre_hook(lambda m, args: seen.__setitem__("x", args[0].detach()))
            try:
                with torch.no_grad():
                    tiny.model(input_ids=step.input_ids[None, :])
            finally:
                handle.remove()
            want = seen["x"][0, step.position].float()
            assert torch.allclose(acts[j, layer], want, rtol=1e-5, atol=1e-6), (layer, j)
    assert acts.abs().sum() > 0


class _Unknown(nn.Module):
    def __init__(self):
        super().__init__()
        self.config = type("C", (), {"model_type": "mamba"})()


def test_unsupported_architecture_is_a_clear_error():
    with pytest.raises(kn_edit.UnsupportedArchitectureError, match="supported model types.*gpt2.*adapter_from_paths"):
        find_adapter(_Unknown())


def test_custom_adapter_from_paths_describes_a_new_family():
    model, tok = build_model("llama")
    model.config.model_type = "my_llama_variant"
    with pytest.raises(kn_edit.UnsupportedArchitectureError):
        kn_edit.wrap(model, tok)
    adapter = kn_edit.adapter_from_paths(
        family="my_llama_variant", layers="model.layers", value_proj="mlp.down_proj", embeddings="model.embed_tokens"
    )
    km = kn_edit.wrap(model, tok, adapter=adapter)
    assert km.value_proj(0) is model.model.layers[0].mlp.down_proj


def test_adapter_with_wrong_path_is_a_clear_error():
    model, tok = build_model("llama")
    adapter = kn_edit.adapter_from_paths(family="x", layers="model.layers", value_proj="mlp.nope", embeddings="model.embed_tokens")
    with pytest.raises(kn_edit.UnsupportedArchitectureError, match="mlp.nope"):
        kn_edit.wrap(model, tok, adapter=adapter)


def test_hooks_are_removed_after_an_exception(tiny):
    def boom(layer, act):
        raise RuntimeError("inside hook")

    step = tiny.encode(*(("a [MASK] b", "paris") if tiny.is_masked_lm else ("The capital of France is", "Paris"))).steps[0]
    ids, mask = tiny.pad([step.input_ids])
    with pytest.raises(RuntimeError, match="inside hook"):
        with value_input_hooks(tiny.value_projs(), boom):
            tiny.model(input_ids=ids, attention_mask=mask)
    assert hook_count(tiny) == 0
