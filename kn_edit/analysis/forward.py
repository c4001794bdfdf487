"""FFN activations of selected neurons, with the forward pass stopped after the highest layer needed.

A pre-hook on the value projection of the highest requested layer captures its input and then raises a private
exception, so the layers above (and the LM head) never run. Every captured activation is computed by exactly the
same operations as in the full forward pass, so it is bit-for-bit the same (tested).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Mapping, Sequence

import torch

from ..models.hooks import value_input_hooks

if TYPE_CHECKING:
    from ..models.model import KnModel


class _StopForward(Exception):
    """Raised by our own hook once the last needed layer has been captured; never escapes this module."""


@torch.no_grad()
def neuron_activations(
    km: KnModel,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    indices: Mapping[int, Sequence[int] | torch.Tensor],
    stop_early: bool = True,
) -> dict[int, torch.Tensor]:
    """{layer: activations [batch, seq, n_indices]} of the value-projection inputs ``indices[layer]`` (all
    positions, float32, on the model's device). ``stop_early``: skip the layers above the highest one."""
    if not indices:
        return {}
    wanted = {l: torch.as_tensor(list(i) if not isinstance(i, torch.Tensor) else i, dtype=torch.long, device=km.device)
              for l, i in indices.items()}
    last = max(wanted)
    captured: dict[int, torch.Tensor] = {}

    def capture(layer: int, act: torch.Tensor) -> None:
        captured[layer] = act.index_select(-1, wanted[layer]).float()
        if stop_early and layer == last:
            raise _StopForward

    with value_input_hooks(km.value_projs(sorted(wanted)), capture):
        try:
            km.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        except _StopForward:
            pass
    return captured
