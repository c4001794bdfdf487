"""Value vectors of knowledge neurons as parameter slices: where neuron (l, i)'s value vector lives in the
model's parameters, reading a set of them, and turning new vectors into ledger changes."""

from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

import torch

from ..errors import EditError
from ..models.neurons import Neuron, by_layer, check_neurons
from .ledger import SliceChange

if TYPE_CHECKING:
    from ..models.model import KnModel


def value_location(km: KnModel, layer: int) -> tuple[str, int]:
    """(parameter name, dim) of layer's value weight; value vector i is slice i along dim.
    nn.Linear weights are [d_model, d_ff] (dim 1); GPT-2's Conv1D is [d_ff, d_model] (dim 0)."""
    weight = km.value_weight(layer)
    for name, param in km.model.named_parameters():
        if param is weight:
            return name, km.adapter.value_dim
    raise EditError(f"layer {layer}'s value weight is not a named parameter of the model")


def checked(km: KnModel, neurons: Sequence[Neuron]) -> list[Neuron]:
    found = check_neurons(neurons, km.n_layers, km.d_ff)
    if not found:
        raise EditError("no neurons to edit")
    return found


@torch.no_grad()
def value_vectors(km: KnModel, neurons: Sequence[Neuron]) -> torch.Tensor:
    """[n, d_model] float32 CPU copies of the neurons' current value vectors, in the given order."""
    return torch.stack([km.value_vectors(n.layer)[n.index].detach().float().cpu() for n in neurons]) if neurons else torch.zeros(0, km.d_model)


def value_changes(km: KnModel, neurons: Sequence[Neuron], vectors: torch.Tensor, additive: bool) -> list[SliceChange]:
    """Ledger changes that add ``vectors`` [n, d_model] to (or set them as) the neurons' value vectors.
    A neuron listed twice gets the sum of its rows (additive) or its last row (set)."""
    if vectors.shape != (len(neurons), km.d_model):
        raise EditError(f"expected {len(neurons)} vectors of size {km.d_model}, got shape {tuple(vectors.shape)}")
    merged: dict[Neuron, torch.Tensor] = {}
    for n, vec in zip(neurons, vectors):
        merged[n] = merged[n] + vec if (additive and n in merged) else vec
    changes = []
    for layer, indices in by_layer(list(merged)).items():
        name, dim = value_location(km, layer)
        rows = torch.stack([merged[Neuron(layer, i)] for i in indices])  # [k, d_model]
        value = rows if dim == 0 else rows.t()
        changes.append(SliceChange(name, dim, torch.tensor(indices, dtype=torch.long), value, additive))
    return changes


def slice_dim(km: KnModel, name: str) -> int:
    """The dim along which the ledger slices parameter ``name``: value weights along their value vectors (so
    whole-matrix edits and knowledge-neuron edits of one layer stack), any other parameter along dim 0."""
    param = km.model.get_parameter(name)
    for layer in range(km.n_layers):
        if km.value_weight(layer) is param:
            return km.adapter.value_dim
    return 0


def whole_change(km: KnModel, name: str, value: torch.Tensor, additive: bool = True) -> SliceChange:
    """A ledger change of every slice of parameter ``name``: ``value`` (the parameter's shape) is added to it
    (``additive``) or written. One block, no per-slice loop."""
    param = km.model.get_parameter(name)
    if tuple(value.shape) != tuple(param.shape):
        raise EditError(f"a change of {name} must have its shape {tuple(param.shape)}, got {tuple(value.shape)}")
    dim = slice_dim(km, name)
    return SliceChange(name, dim, torch.arange(param.shape[dim]), value, additive)
