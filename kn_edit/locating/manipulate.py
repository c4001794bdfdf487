"""Suppress or amplify knowledge neurons at the answer position (Dai et al. 2022, §4.2).

Inside ``with suppress(km, neurons):`` every forward pass of ``km.model`` sets those neurons' activations to 0
at the answer position of each row, and ``amplify`` multiplies them by ``factor``; every other position and
neuron computes as usual. The answer position is found from the model's own inputs, so any caller works
(``km.step_logits``, ``km.prob``, a plain ``km.model(...)`` call, batched or not):

* masked LM: the first mask token of the row (in a teacher-forced multi-token step the earlier masks are
  already filled in, so the first remaining mask is the token being predicted);
* causal LM: the last attended position of the row (right or left padding alike). With a key/value cache
  (``generate``) that is the newest token of each step.

A row without an answer position (a masked-LM row without a mask token) is left unchanged. Hooks are
registered on entry and exactly ours are removed on exit, also on an exception; weights are never written.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import TYPE_CHECKING, Iterator, Sequence

import torch

from ..errors import KnEditError
from ..models.hooks import value_input_hooks
from ..models.neurons import Neuron, by_layer, check_neurons

if TYPE_CHECKING:
    from ..models.model import KnModel


def answer_positions(km: KnModel, input_ids: torch.Tensor | None, attention_mask: torch.Tensor | None,
                     seq_len: int) -> torch.Tensor:
    """Answer position [batch] of each row within the current input (-1: none), on the inputs' device."""
    if km.is_masked_lm:
        if input_ids is None:
            raise KnEditError("suppress/amplify on a masked LM needs input_ids to find the mask token")
        is_mask = input_ids == km.tokenizer.mask_token_id  # [batch, seq]
        seq = torch.arange(input_ids.shape[1], device=input_ids.device)
        first = torch.where(is_mask, seq, input_ids.shape[1]).min(dim=1).values
        return torch.where(first < input_ids.shape[1], first, -1)
    if attention_mask is None:
        batch = input_ids.shape[0] if input_ids is not None else 1
        device = input_ids.device if input_ids is not None else km.device
        return torch.full((batch,), seq_len - 1, dtype=torch.long, device=device)
    seq = torch.arange(attention_mask.shape[1], device=attention_mask.device)
    last = torch.where(attention_mask.bool(), seq, -1).max(dim=1).values  # [batch]
    # With a cache the mask covers past + current tokens; shift into the current input.
    shifted = last - (attention_mask.shape[1] - seq_len)
    return torch.where(shifted >= 0, shifted, -1)


def _model_inputs(args: tuple, kwargs: dict) -> tuple[torch.Tensor | None, torch.Tensor | None, int]:
    input_ids = kwargs.get("input_ids", args[0] if args and isinstance(args[0], torch.Tensor) else None)
    mask = kwargs.get("attention_mask")
    if mask is None and len(args) > 1 and isinstance(args[1], torch.Tensor):
        mask = args[1]
    embeds = kwargs.get("inputs_embeds")
    if input_ids is not None:
        seq_len = input_ids.shape[-1]
    elif embeds is not None:
        seq_len = embeds.shape[1]
    else:
        raise KnEditError("suppress/amplify: the model was called without input_ids or inputs_embeds")
    if input_ids is not None and input_ids.dim() == 1:
        input_ids = input_ids.unsqueeze(0)
    return input_ids, mask, seq_len


@contextmanager
def scale_neurons(km: KnModel, neurons: Sequence[Neuron], factor: float) -> Iterator[None]:
    """Multiply the neurons' activations by ``factor`` at the answer position (``factor=0``: set to exactly 0)."""
    neurons = check_neurons(neurons, km.n_layers, km.d_ff)
    if not neurons:
        yield
        return
    factor = float(factor)
    indices = {l: torch.tensor(idx, dtype=torch.long) for l, idx in by_layer(neurons).items()}
    # Set by the root pre-hook, read by the value-projection hooks, cleared after each forward.
    current: dict[str, torch.Tensor] = {}

    def root_pre_hook(_module, args, kwargs):
        input_ids, mask, seq_len = _model_inputs(args, kwargs)
        current["positions"] = answer_positions(km, input_ids, mask, seq_len)
        return None

    def root_post_hook(_module, _args, _kwargs, _output):
        current.pop("positions", None)
        return None

    def change(layer: int, act: torch.Tensor) -> torch.Tensor:
        positions = current.get("positions")
        if positions is None:
            raise KnEditError(
                "suppress/amplify: a value projection ran outside a forward pass of km.model, so the answer "
                "position is unknown; call the model itself inside the block"
            )
        positions = positions.to(act.device)
        rows = torch.nonzero(positions >= 0, as_tuple=True)[0]  # [r]
        if rows.numel() == 0:
            return act
        idx = indices[layer].to(act.device)
        out = act.clone()
        r, p, i = rows[:, None], positions[rows][:, None], idx[None, :]  # broadcast to [r, n_idx]
        out[r, p, i] = torch.zeros((), dtype=act.dtype, device=act.device) if factor == 0.0 else act[r, p, i] * factor
        return out

    root = km.model
    handles = []
    try:
        handles.append(root.register_forward_pre_hook(root_pre_hook, with_kwargs=True))
        handles.append(root.register_forward_hook(root_post_hook, with_kwargs=True, always_call=True))
        with value_input_hooks(km.value_projs(sorted(indices)), change):
            yield
    finally:
        for handle in handles:
            handle.remove()


@contextmanager
def suppress(km: KnModel, neurons: Sequence[Neuron]) -> Iterator[None]:
    """Set the neurons' activations to 0 at the answer position while the block runs."""
    with scale_neurons(km, neurons, 0.0):
        yield


@contextmanager
def amplify(km: KnModel, neurons: Sequence[Neuron], factor: float = 2.0) -> Iterator[None]:
    """Multiply the neurons' activations by ``factor`` (default: double them) at the answer position."""
    if isinstance(factor, bool) or not isinstance(factor, (int, float)) or not torch.isfinite(torch.tensor(float(factor))):
        raise KnEditError(f"amplify factor must be a finite number, got {factor!r}")
    with scale_neurons(km, neurons, factor):
        yield
