"""Architecture adapters: where each model family keeps its layers, FFN value projection and embeddings.

Adapters are data (one frozen record per family), so adding a family is adding one record and a test.
A knowledge neuron is one coordinate of the *input* of the value projection (post-activation; for
gated FFNs the product act(G·h) ⊙ (U·h)); its value vector is the matching column of that
projection's weight (a row for GPT-2's transposed Conv1D).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..errors import UnsupportedArchitectureError


@dataclass(frozen=True)
class ArchitectureAdapter:
    """Module paths of one model family. Paths are dotted attribute names; list entries use digits."""

    family: str
    model_types: tuple[str, ...]
    # Candidate paths (from the root model) of the ModuleList of transformer blocks; the first that exists wins.
    layers: tuple[str, ...]
    # Path, relative to one block, of the FFN value projection (the matrix V in FFN(h) = V·act(K·h)).
    value_proj: str
    # Candidate paths of the input word-embedding module.
    embeddings: tuple[str, ...]
    # True where the value projection's weight is stored [d_ff, d_model] (GPT-2's Conv1D).
    value_weight_transposed: bool = False
    masked_lm: bool = False
    # Gemma multiplies input embeddings by sqrt(d_model); recorded so users of E(x) can see it.
    embedding_scale_sqrt_d: bool = False

    # The weight's orientation is known here only: everything else reads value vectors through these.
    @property
    def value_dim(self) -> int:
        """The value weight's dim that indexes neurons: value vector i is the weight's slice i along it."""
        return 0 if self.value_weight_transposed else 1

    def as_value_vectors(self, weight: torch.Tensor) -> torch.Tensor:
        """A value weight (or anything in its layout, e.g. its gradient) viewed as [d_ff, d_model] rows."""
        return weight if self.value_weight_transposed else weight.t()

    def as_value_weight(self, vectors: torch.Tensor) -> torch.Tensor:
        """[d_ff, d_model] rows viewed in the value weight's layout (the inverse of :meth:`as_value_vectors`)."""
        return vectors if self.value_weight_transposed else vectors.t()


ADAPTERS: tuple[ArchitectureAdapter, ...] = (
    ArchitectureAdapter(
        family="bert",
        model_types=("bert",),
        layers=("bert.encoder.layer",),
        value_proj="output.dense",
        embeddings=("bert.embeddings.word_embeddings",),
        masked_lm=True,
    ),
    ArchitectureAdapter(
        family="gpt2",
        model_types=("gpt2",),
        layers=("transformer.h",),
        value_proj="mlp.c_proj",
        embeddings=("transformer.wte",),  # not wpe: that is the position embedding
        value_weight_transposed=True,
    ),
    ArchitectureAdapter(
        family="llama",
        model_types=("llama", "mistral", "qwen2", "smollm2"),
        layers=("model.layers",),
        value_proj="mlp.down_proj",
        embeddings=("model.embed_tokens",),
    ),
    ArchitectureAdapter(
        family="gemma3",
        model_types=("gemma3", "gemma3_text"),
        layers=("model.layers", "model.language_model.layers", "language_model.model.layers"),
        value_proj="mlp.down_proj",
        embeddings=("model.embed_tokens", "model.language_model.embed_tokens", "language_model.model.embed_tokens"),
        embedding_scale_sqrt_d=True,
    ),
    ArchitectureAdapter(
        family="gpt_neox",
        model_types=("gpt_neox",),
        layers=("gpt_neox.layers",),
        value_proj="mlp.dense_4h_to_h",
        embeddings=("gpt_neox.embed_in",),
    ),
    ArchitectureAdapter(
        family="gptj",
        model_types=("gptj",),
        layers=("transformer.h",),
        value_proj="mlp.fc_out",
        embeddings=("transformer.wte",),
    ),
)


def supported_model_types() -> list[str]:
    return sorted({t for a in ADAPTERS for t in a.model_types})


def get_submodule(root: nn.Module, path: str) -> nn.Module | None:
    """Follow a dotted path; None when any step is missing."""
    node: object = root
    for part in path.split("."):
        node = getattr(node, part, None)
        if node is None:
            return None
    return node if isinstance(node, nn.Module) else None


def first_submodule(root: nn.Module, paths: tuple[str, ...]) -> nn.Module | None:
    for path in paths:
        found = get_submodule(root, path)
        if found is not None:
            return found
    return None


def adapter_from_paths(
    family: str,
    layers: str,
    value_proj: str,
    embeddings: str,
    value_weight_transposed: bool = False,
    masked_lm: bool = False,
) -> ArchitectureAdapter:
    """Describe a new architecture by its module paths (what `models.<name>.adapter` in config holds)."""
    return ArchitectureAdapter(
        family=family,
        model_types=(family,),
        layers=(layers,),
        value_proj=value_proj,
        embeddings=(embeddings,),
        value_weight_transposed=value_weight_transposed,
        masked_lm=masked_lm,
    )


def find_adapter(model: nn.Module) -> ArchitectureAdapter:
    """The adapter for a Hugging Face model, by its config's model_type, checked against the module tree."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    for adapter in ADAPTERS:
        if model_type in adapter.model_types:
            if first_submodule(model, adapter.layers) is None:
                raise UnsupportedArchitectureError(
                    f"model_type {model_type!r} matches the {adapter.family} adapter, but none of its layer paths "
                    f"{list(adapter.layers)} exists in {type(model).__name__} (is this the language-model head class?)"
                )
            return adapter
    raise UnsupportedArchitectureError(
        f"unsupported architecture {model_type!r} ({type(model).__name__}); supported model types: "
        f"{', '.join(supported_model_types())}. To add one, describe its module paths: "
        "kn_edit.wrap(model, tokenizer, adapter=kn_edit.adapter_from_paths(family=..., layers='model.layers', "
        "value_proj='mlp.down_proj', embeddings='model.embed_tokens'))"
    )
