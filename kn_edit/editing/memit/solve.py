"""MEMIT's batch update of one layer (Meng et al. 2023, eq. 14): with the batch's keys K [d_ff, n], the residuals
R [d_model, n] the layer should add at them, and the preserved keys' statistics C = E[k kᵀ] weighted by λ,

    ΔW = R Kᵀ (λ C + K Kᵀ)⁻¹  =  R (λ I + Kᵀ C⁻¹ K)⁻¹ (C⁻¹ K)ᵀ

(the second form by the push-through identity Kᵀ (λC + KKᵀ)⁻¹ = (λI + KᵀC⁻¹K)⁻¹ KᵀC⁻¹). It is computed in the
second form (the least-change solve of kn_edit.editing.keyvalue.solve): one solve with C and an n × n system instead of a d_ff × d_ff inverse, and it stays well defined at
λ = 0, where ΔW K = R exactly and one key gives ROME's rank-one update Λ (C⁻¹k)ᵀ, Λ = r / (kᵀC⁻¹k).
"""

from __future__ import annotations

import torch

from ..keyvalue.solve import least_change


def memit_delta(residuals: torch.Tensor, keys: torch.Tensor, mom2: torch.Tensor, weight: float,
                ridge: float = 0.0, factors: dict | None = None) -> torch.Tensor:
    """ΔW [d_model, d_ff] float64. residuals R [d_model, n], keys K [d_ff, n], mom2 C [d_ff, d_ff], weight λ;
    ridge: C + ridge · mean(diag C) · I (ROME's cov_ridge); factors: C's factorization memo
    (``KeyStatistics.memo``)."""
    # the soft least change: λ weighs general text's keys against the batch's own (kn_edit.editing.keyvalue.solve)
    hint = ("take the key statistics over more text (cov_tokens), set cov_ridge > 0 or mom2_update_weight > 0, or "
            "edit requests that share a subject's key in separate batches")
    return least_change(mom2, keys.T, residuals.T, ridge, softness=weight, hint=hint, factors=factors)
