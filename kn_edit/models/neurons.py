"""The knowledge neuron: one coordinate of the input to one layer's FFN value projection."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Sequence

from ..errors import KnEditError


@dataclass(frozen=True, order=True)
class Neuron:
    """Coordinate ``index`` (of ``d_ff``) of the value-projection input at layer ``layer``."""

    layer: int
    index: int

    def __str__(self) -> str:
        return f"{self.layer}:{self.index}"


def parse_neurons(text: str) -> list[Neuron]:
    """``"3:120,5:7"`` → [Neuron(3, 120), Neuron(5, 7)] (the CLI's ``--neurons`` format)."""
    out = []
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        layer, sep, index = part.partition(":")
        if not sep or not layer.strip().isdigit() or not index.strip().isdigit():
            raise KnEditError(f"bad neuron {part!r}: write LAYER:INDEX, e.g. 12:345 (several separated by commas)")
        out.append(Neuron(int(layer), int(index)))
    if not out:
        raise KnEditError(f"no neurons in {text!r}: write LAYER:INDEX[,LAYER:INDEX...]")
    return out


def check_neurons(neurons: Iterable[Neuron], n_layers: int, d_ff: int) -> list[Neuron]:
    """Sorted, de-duplicated neurons, each checked to exist in a model of that shape."""
    checked = set()
    for n in neurons:
        if not isinstance(n, Neuron):
            raise KnEditError(f"expected Neuron(layer, index), got {n!r}")
        if not 0 <= n.layer < n_layers or not 0 <= n.index < d_ff:
            raise KnEditError(f"neuron {n} does not exist: the model has {n_layers} layers of {d_ff} neurons")
        checked.add(n)
    return sorted(checked)


def by_layer(neurons: Sequence[Neuron]) -> dict[int, list[int]]:
    """{layer: [indices]} of the neurons, layers and indices ascending."""
    out: dict[int, list[int]] = {}
    for n in sorted(set(neurons)):
        out.setdefault(n.layer, []).append(n.index)
    return out
