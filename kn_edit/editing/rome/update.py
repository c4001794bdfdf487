"""ROME's closed-form rank-one update (Meng et al. 2022, eq. 2): with u = C⁻¹k*,

    W ← W + Λ uᵀ,   Λ = (v* − W k*) / (uᵀ k*)

so that the new W maps k* exactly to v* (W' k* = W k* + Λ (uᵀk*) = v*) while keys k with uᵀk = 0 — the
directions least correlated with k* under C — are mapped as before. W is [d_model, d_ff] (nn.Linear); GPT-2's
Conv1D stores Wᵀ, so its change is transposed. A scalar multiple of C cancels in Λ uᵀ.
"""

from __future__ import annotations

import torch

from ...errors import EditError


def solve_key(mom2: torch.Tensor, key: torch.Tensor, ridge: float = 0.0) -> torch.Tensor:
    """u = (C + ridge · mean(diag C) · I)⁻¹ k* [d_ff] float64; mom2: C [d_ff, d_ff], key: k* [d_ff]."""
    c = mom2.to(torch.float64)
    if ridge:
        c = c + ridge * c.diagonal().mean() * torch.eye(c.shape[0], dtype=c.dtype)
    try:
        u = torch.linalg.solve(c, key.to(torch.float64).cpu())
    except RuntimeError as exc:  # torch.linalg.LinAlgError subclasses RuntimeError
        raise EditError(f"the key statistics are singular ({exc}); take them over more text (cov_tokens) or set "
                        "cov_ridge > 0") from exc
    if not bool(torch.isfinite(u).all()):
        raise EditError("the key statistics are singular; take them over more text (cov_tokens) or set cov_ridge > 0")
    return u


def rank_one_delta(u: torch.Tensor, key: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
    """Λ uᵀ [d_model, d_ff] float64 with Λ = residual / (uᵀ key); residual = v* − W k* [d_model]."""
    u, key, residual = u.to(torch.float64), key.to(torch.float64), residual.to(torch.float64)
    denominator = float(u @ key)
    if not denominator > 0:
        raise EditError(f"(C⁻¹k*)ᵀk* = {denominator:.3g} is not positive: the key statistics do not fit this key")
    return torch.outer(residual / denominator, u)


def weight_change(km, delta: torch.Tensor) -> torch.Tensor:
    """``delta`` [d_model, d_ff] in the orientation (and dtype) of the value projection's weight."""
    weight = km.value_weight(0)
    oriented = delta.t() if km.adapter.value_weight_transposed else delta
    return oriented.to(weight.dtype).contiguous()
