"""Update rules: how a knowledge neuron's value vector v_i moves to turn old into new. Pure tensor functions,
each returning the deltas [n, d_model] that are *added* to the value vectors.

* ``paper`` (Dai et al. 2022): v_i ← v_i − λ1·(‖v_i‖/‖E(old)‖)·E(old) + λ2·(‖v_i‖/‖E(new)‖)·E(new), λ1 = 1, λ2 = 8.
* ``unscaled`` (EasyEdit and ROME's KN baseline): v_i ← v_i − f·E(old) + f·E(new), f = 2.
* ``signed``: neuron i adds a_i·v_i to the residual stream at the answer position, and in gated FFNs a_i is
  often negative, so the two rules above can lower P(new); the signed rule moves each value vector the way
  that raises new, by just enough. With the ``contrast`` or ``new`` direction the deltas are
  δ_i = s · w_i · d̂ with d̂ the unit direction E(new) − E(old) (or E(new)) and w_i = a_i / Σ_j a_j²
  (``activation`` weighting, the least-norm deltas giving Σ_i a_i·δ_i = s·d̂) or w_i = sign(a_i) / Σ_j |a_j|
  (``sign`` weighting, same shift). So the scale s is the length of the shift of the residual stream at the
  answer position (with the activations held fixed); the editor searches the smallest s that makes new the
  top prediction with a margin.
* ``signed`` with the ``gradient`` direction (kn-edit's default): no fixed direction. The change δ of the
  neurons' value vectors is found by successive linearization (kn_edit.editing.knowledge_neurons): at each
  step, every answer token of new (on every edit prompt, teacher-forced) still below the margin contributes
  the constraint ⟨k_p, δ⟩ = r_p, with k_p the gradient of its margin (logit of the token minus the strongest
  other token) with respect to the value vectors (kn_edit.editing.sensitivity) and r_p the logits missing to
  margin + ½; the step is the δ of least tr(δᵀ·M·δ) meeting them, M the preservation metric
  (kn_edit.editing.preserve: how much δ would move the FFN output on generic prompts) or the identity
  (``preserve=False``). The gradient sees what the layers above, attention and the final norm do to a change,
  which E(new) − E(old) does not; the reported scale is ‖δ‖ / ‖V‖ (Frobenius norms over the edited neurons:
  the change relative to their value vectors).
"""

from __future__ import annotations

import torch

from ..errors import ConfigError, EditError

RULES = ("signed", "paper", "unscaled")
WEIGHTINGS = ("activation", "sign")
DIRECTIONS = ("gradient", "contrast", "new")


def paper_deltas(values: torch.Tensor, e_old: torch.Tensor, e_new: torch.Tensor, lambda_old: float = 1.0,
                 lambda_new: float = 8.0) -> torch.Tensor:
    """values [n, d_model], e_old/e_new [d_model] → deltas [n, d_model] of the paper's rule."""
    norms = values.norm(dim=1, keepdim=True)  # [n, 1]
    return -lambda_old * (norms / e_old.norm()) * e_old + lambda_new * (norms / e_new.norm()) * e_new


def unscaled_deltas(n: int, e_old: torch.Tensor, e_new: torch.Tensor, factor: float = 2.0) -> torch.Tensor:
    """deltas [n, d_model]: −factor·E(old) + factor·E(new) for every neuron."""
    return (-factor * e_old + factor * e_new).expand(n, -1).clone()


def signed_direction(e_old: torch.Tensor, e_new: torch.Tensor, direction: str = "contrast") -> torch.Tensor:
    """Unit vector d̂ [d_model]: along E(new) − E(old) (``contrast``) or E(new) (``new``)."""
    if direction not in ("contrast", "new"):
        raise ConfigError(f"direction must be one of {DIRECTIONS}, got {direction!r}")
    d = e_new - e_old if direction == "contrast" else e_new
    norm = d.norm()
    if not torch.isfinite(norm) or norm == 0:
        raise EditError("E(new) and E(old) coincide: no direction to move the value vectors along")
    return d / norm


def signed_unit_deltas(activations: torch.Tensor, direction: torch.Tensor, weighting: str = "activation") -> torch.Tensor:
    """activations [n] (a_i at the answer position), direction [d_model] unit → deltas [n, d_model] for s = 1."""
    if weighting not in WEIGHTINGS:
        raise ConfigError(f"weighting must be one of {WEIGHTINGS}, got {weighting!r}")
    a = activations.float()
    if weighting == "activation":
        total = (a * a).sum()
        w = a / total
    else:
        total = a.abs().sum()
        w = torch.sign(a) / total
    if not torch.isfinite(total) or total == 0:
        raise EditError("the neurons do not fire at the answer position (all activations are 0): nothing to scale")
    return w[:, None] * direction[None, :]
