"""How the answer's logit gap responds to the value vectors: the gradient of the mean over the edit prompts of
logit(new) − logit(old) with respect to each neuron's value vector v_i.

v_i enters the model only through its layer's value projection, at every position where the neuron fires, so
∂gap/∂v_i = Σ_t a_i(t)·∇_l(t): the activations at all positions times the gradient of the gap with respect to
that layer's FFN output there. Everything between the neuron and the logits (the layers above, attention from
the answer position back to earlier ones, the final norm's gain, Gemma's post-FFN norm) is inside it, which a
fixed direction such as E(new) − E(old) ignores.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

import torch

from ..models.neurons import Neuron
from ..models.prompts import AnswerStep

if TYPE_CHECKING:
    from ..models.model import KnModel


def value_gradients(km: KnModel, steps: Sequence[AnswerStep], neurons: Sequence[Neuron],
                    old_ids: Sequence[int]) -> torch.Tensor:
    """[n_neurons, d_model] float32 CPU: ∂/∂v_i of the mean over ``steps`` of logit(step.target_id) −
    logit(old_ids[k]) at each step's answer position."""
    return step_value_gradients(km, steps, neurons, old_ids).mean(dim=0)


def step_value_gradients(km: KnModel, steps: Sequence[AnswerStep], neurons: Sequence[Neuron],
                         old_ids: Sequence[int]) -> torch.Tensor:
    """[n_steps, n_neurons, d_model] float32 CPU: for each step alone, ∂/∂v_i of logit(step.target_id) −
    logit(old_ids[k]) (:func:`value_gradients` of ``[step]``), from one padded forward and one backward instead
    of one of each per step. Rows never interact, so the backward of the summed gaps leaves each row's own
    gradient ∇(t) at each value projection's output, and ∂gap/∂v_i = Σ_t a_i(t)·∇(t) over the row's positions
    (padding gets ∇ = 0)."""
    layers = sorted({n.layer for n in neurons})
    ids, mask = km.pad([s.input_ids for s in steps])
    rows = torch.arange(len(steps), device=km.device)
    pos = torch.tensor([s.position for s in steps], device=km.device)
    seen: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # layer → (value-projection input, output)

    def keep(layer: int):
        def hook(_module, args, output):
            seen[layer] = (args[0].detach(), output)

        return hook

    handles = []
    try:
        for layer in layers:
            handles.append(km.value_proj(layer).register_forward_hook(keep(layer)))
        with torch.enable_grad():
            logits = km.model(input_ids=ids, attention_mask=mask).logits[rows, pos].float()  # [n, vocab]
    finally:
        for handle in handles:
            handle.remove()
    new = torch.tensor([s.target_id for s in steps], device=logits.device)
    old = torch.tensor(list(old_ids), device=logits.device)
    with torch.enable_grad():
        grads = torch.autograd.grad((logits[rows, new] - logits[rows, old]).sum(), [seen[l][1] for l in layers])
    by_neuron = {}
    for layer, grad in zip(layers, grads):
        idx = [n.index for n in neurons if n.layer == layer]
        per = torch.einsum("bsk,bsd->bkd", seen[layer][0][:, :, idx].float(), grad.float()).cpu()  # [n_steps, k, d]
        by_neuron.update({(layer, i): per[:, j] for j, i in enumerate(idx)})
    return torch.stack([by_neuron[(n.layer, n.index)] for n in neurons], dim=1)


def least_norm_step(gradients: torch.Tensor, residuals: torch.Tensor, metric: torch.Tensor | None = None) -> torch.Tensor:
    """gradients [P, n, d_model] (one per constraint), residuals [P] → the δ [n, d_model] of least
    tr(δᵀ·metric·δ) (metric [n, n] positive definite; None: the identity, the least Frobenius norm) with
    ⟨gradients[p], δ⟩ = residuals[p] for every p: δ = Σ_p λ_p·metric⁻¹·gradients[p], G·λ = residuals."""
    k = gradients.double()
    pulled = k if metric is None else torch.linalg.solve(metric.double(), k)  # metric⁻¹·K_p  [P, n, d]
    flat, pulled_flat = k.reshape(len(k), -1), pulled.reshape(len(k), -1)
    gram = flat @ pulled_flat.T
    lam = torch.linalg.lstsq(gram, residuals.double()[:, None]).solution[:, 0]  # lstsq: robust to parallel rows
    return (lam @ pulled_flat).reshape(gradients.shape[1:]).float()
