"""What an update should leave alone, as a metric on the value-vector change.

A change δ_i of neuron i's value vector moves the FFN output by Σ_i a_i(x)·δ_i at every token x. Over a set of
tokens X that the edit should not touch, the squared size of that movement is tr(δᵀ·C·δ) with
C = mean over X of a(x)·a(x)ᵀ (the neurons' co-activation). The gradient rule minimizes tr(δᵀ·(C + ρ·c̄·I)·δ)
(c̄ the mean of C's diagonal, ρ the ridge), so the edit is carried by the neurons that fire on the fact's
prompts but not on X. X: every token of the editor's generic prompts (kn_edit.editing.filters.GENERIC_PROMPTS).
(Adding the edit prompts with the subject swapped for other subjects did not keep more of the other facts on
smollm2: 84.4 % against 86.4 %, measured with the former evaluations/edit_rules.py, so it is not done.)
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

import torch

from ..models.hooks import run_until, value_input_hooks
from ..models.neurons import Neuron
from ..models.prompts import encode_prompt_only
from .filters import with_slot
from .memo import memoized

if TYPE_CHECKING:
    from ..models.model import KnModel

# Token activations of every layer are kept (kn_edit.editing.memo) where they take at most this much memory
# (smollm2-135m and the generic prompts: ~30 MB).
_MEMO_BYTES = 64 * 1024**2


def token_activations(km: KnModel, prompts: Sequence[str], neurons: Sequence[Neuron]) -> torch.Tensor:
    """The neurons' activations at every token of every prompt (masked LMs: with an answer slot appended
    where a prompt has none): [n_tokens, n_neurons], float32 CPU."""
    # Whole layers, kept per weight state (kn_edit.editing.memo) for later edits' neurons: every layer from the
    # first forward where they fit in _MEMO_BYTES, else the layers asked for.
    stored: dict[int, torch.Tensor] = memoized(km, "token_activations", tuple(prompts), dict, keep=2)
    missing = sorted({n.layer for n in neurons} - set(stored))
    if missing:
        ids, mask = km.pad([encode_prompt_only(km.tokenizer, with_slot(km, p), km.is_masked_lm)[0] for p in prompts])
        if not stored and int(mask.sum()) * km.n_layers * km.d_ff * 4 <= _MEMO_BYTES:
            missing = list(range(km.n_layers))
        stored.update(layer_token_activations(km, ids, mask, missing))
    return torch.stack([stored[n.layer][:, n.index] for n in neurons], dim=1)


@torch.no_grad()
def layer_token_activations(km: KnModel, ids: torch.Tensor, mask: torch.Tensor,
                            layers: Sequence[int]) -> dict[int, torch.Tensor]:
    """{layer: [n_tokens, d_ff]}: the value-projection input at every token of the padded batch ``ids`` [B, seq]
    (padding left out by ``mask``, tokens in row-major order), one forward that stops once the highest of
    ``layers`` has its input (nothing above it is computed)."""
    captured: dict[int, torch.Tensor] = {}

    def capture(layer: int, act: torch.Tensor) -> None:
        captured[layer] = act[mask.bool()].float().cpu()  # [n_tokens, d_ff]; padding left out

    with value_input_hooks(km.value_projs(list(layers)), capture):
        run_until(km.model, km.value_proj(max(layers)), input_ids=ids, attention_mask=mask)
    return captured


def preservation_metric(km: KnModel, neurons: Sequence[Neuron], prompts: Sequence[str], ridge: float) -> torch.Tensor:
    """[n, n]: C + ridge·mean(diag C)·I, C the neurons' co-activation over every token of ``prompts``."""
    acts = token_activations(km, prompts, neurons)  # [T, n]
    cov = acts.T @ acts / len(acts)
    return cov + ridge * float(cov.diagonal().mean().clamp(min=1e-12)) * torch.eye(len(neurons))
