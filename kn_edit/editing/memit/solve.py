"""MEMIT's batch update of one layer (Meng et al. 2023, eq. 14): with the batch's keys K [d_ff, n], the residuals
R [d_model, n] the layer should add at them, and the preserved keys' statistics C = E[k kᵀ] weighted by λ,

    ΔW = R Kᵀ (λ C + K Kᵀ)⁻¹  =  R (λ I + Kᵀ C⁻¹ K)⁻¹ (C⁻¹ K)ᵀ

(the second form by the push-through identity Kᵀ (λC + KKᵀ)⁻¹ = (λI + KᵀC⁻¹K)⁻¹ KᵀC⁻¹). It is computed in the
second form: one solve with C and an n × n system instead of a d_ff × d_ff inverse, and it stays well defined at
λ = 0, where ΔW K = R exactly and one key gives ROME's rank-one update Λ (C⁻¹k)ᵀ, Λ = r / (kᵀC⁻¹k).
"""

from __future__ import annotations

import torch

from ...errors import EditError
from ..rome.update import solve_key


def memit_delta(residuals: torch.Tensor, keys: torch.Tensor, mom2: torch.Tensor, weight: float,
                ridge: float = 0.0) -> torch.Tensor:
    """ΔW [d_model, d_ff] float64. residuals R [d_model, n], keys K [d_ff, n], mom2 C [d_ff, d_ff], weight λ;
    ridge: C + ridge · mean(diag C) · I (ROME's cov_ridge)."""
    r, k = residuals.to(torch.float64).cpu(), keys.to(torch.float64).cpu()
    pulled = solve_key(mom2, k, ridge)  # C⁻¹K [d_ff, n]
    gram = weight * torch.eye(k.shape[1], dtype=torch.float64) + k.T @ pulled  # [n, n], symmetric
    try:
        coefficients = torch.linalg.solve(gram, r.T)  # [n, d_model] = G⁻¹ Rᵀ
    except RuntimeError as exc:
        raise EditError(f"the batch's keys are linearly dependent ({exc}): two requests share a subject's key; set "
                        "mom2_update_weight > 0 or edit them in separate batches") from exc
    if not bool(torch.isfinite(coefficients).all()):
        raise EditError("the batch's keys are linearly dependent; set mom2_update_weight > 0")
    return coefficients.T @ pulled.T
