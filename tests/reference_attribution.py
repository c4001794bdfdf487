"""A slow, plainly written integrated-gradients reference, the formula of KN_METHOD.md taken literally.

For one answer step (answer position t, gold token y) and one layer l with original activation w = a_l[t]:

    Attr(w_i) = w_i / m * sum_{k=0}^{m-1} dP(y | a_l[t] := (k/m) w) / d a_l[t]_i

One full forward of the whole prompt per (layer, k), no batching, no cache; kn_edit's fast version must match it.
"""

from __future__ import annotations

import torch


def _forward_prob(km, ids: torch.Tensor, position: int, target_id: int) -> torch.Tensor:
    logits = km.model(input_ids=ids.unsqueeze(0).to(km.device)).logits[0, position].float()
    return torch.softmax(logits, dim=-1)[target_id]


def clean_activation(km, ids: torch.Tensor, position: int, layer: int) -> torch.Tensor:
    """a_l[t] of an unmodified forward [d_ff]."""
    seen = {}

    def grab(_module, args):
        seen["w"] = args[0][0, position].detach().clone()

    handle = km.value_proj(layer).register_forward_pre_hook(grab)
    try:
        with torch.no_grad():
            km.model(input_ids=ids.unsqueeze(0).to(km.device))
    finally:
        handle.remove()
    return seen["w"]


def reference_step(km, step, layer: int, m: int, at: int | None = None) -> torch.Tensor:
    """IG scores [d_ff] of one answer step at one layer; at: the position scaled and scored (default the answer
    position; the probability is read at the answer position either way)."""
    at = step.position if at is None else at
    w = clean_activation(km, step.input_ids, at, layer)
    total = torch.zeros_like(w, dtype=torch.float32)
    for k in range(m):
        x = (k / m * w).clone().requires_grad_(True)

        def replace(_module, args):
            act = args[0].clone()
            act[0, at] = x
            return (act, *args[1:])

        handle = km.value_proj(layer).register_forward_pre_hook(replace)
        try:
            with torch.enable_grad():
                prob = _forward_prob(km, step.input_ids, step.position, step.target_id)
                (grad,) = torch.autograd.grad(prob, x)
        finally:
            handle.remove()
        total += grad.float()
    return (w.float() * total / m).cpu()


def reference_attribute(km, prompt: str, target: str, steps: int = 20, layers=None) -> torch.Tensor:
    """[n_layers_selected, d_ff]: per layer, averaged over the target's teacher-forced tokens."""
    layers = list(range(km.n_layers)) if layers is None else list(layers)
    answer_steps = km.encode(prompt, target).steps
    per_step = [torch.stack([reference_step(km, s, l, steps) for l in layers]) for s in answer_steps]
    return torch.stack(per_step).mean(dim=0)


def probability_with(km, step, layer: int, scale: float) -> float:
    """P(y | a_l[t] := scale * w) for the completeness check."""
    w = clean_activation(km, step.input_ids, step.position, layer)

    def replace(_module, args):
        act = args[0].clone()
        act[0, step.position] = scale * w
        return (act, *args[1:])

    handle = km.value_proj(layer).register_forward_pre_hook(replace)
    try:
        with torch.no_grad():
            return float(_forward_prob(km, step.input_ids, step.position, step.target_id))
    finally:
        handle.remove()
