"""ROME's closed-form rank-one update (Meng et al. 2022, eq. 2): with u = C⁻¹k*,

    W ← W + Λ uᵀ,   Λ = (v* − W k*) / (uᵀ k*)

so that the new W maps k* exactly to v* (W' k* = W k* + Λ (uᵀk*) = v*) while keys k with uᵀk = 0 — the
directions least correlated with k* under C — are mapped as before. W is [d_model, d_ff] (nn.Linear); GPT-2's
Conv1D stores Wᵀ, so its change is transposed. A scalar multiple of C cancels in Λ uᵀ.

Several keys (``fit=prompts|rows``): the same rank-one form ΔW = δ wᵀ with the direction w of least C-norm
(wᵀCw) that gives every key k_j the whole shift, wᵀk_j = 1:

    w = C⁻¹K (KᵀC⁻¹K)⁻¹ 1,   K = [k* k_1 … k_m]   [d_ff, m+1]

so W' k_j = W k_j + δ for each of them (with K = [k*] this is the paper's update). Why: v* is optimised with δ
added at the subject's last token of every rewrite row, but the paper's update gives a row only the share
wᵀk_row of δ; on smollm2 (no BOS token) the bare prompts, whose subject starts the text, got about half of it
and a quarter of the edits failed on them (evaluations/results/rome_check.md).
"""

from __future__ import annotations

import torch

from ...errors import EditError


def solve_key(mom2: torch.Tensor, key: torch.Tensor, ridge: float = 0.0) -> torch.Tensor:
    """u = (C + ridge · mean(diag C) · I)⁻¹ k* [d_ff] float64; mom2: C [d_ff, d_ff], key: k* [d_ff] (or several
    keys as columns [d_ff, m], giving [d_ff, m])."""
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


def exact_direction(mom2: torch.Tensor, keys: torch.Tensor, ridge: float = 0.0) -> torch.Tensor:
    """w [d_ff] float64 of least wᵀCw with wᵀk_j = 1 for every row k_j of ``keys`` [m, d_ff] (see the module
    docstring); one key: C⁻¹k / (kᵀC⁻¹k), the paper's direction."""
    keys = keys.to(torch.float64).cpu()
    solved = solve_key(mom2, keys.T, ridge)  # C⁻¹K [d_ff, m]
    gram = keys @ solved  # KᵀC⁻¹K [m, m], symmetric positive definite when the keys are independent
    gram = (gram + gram.T) / 2
    if not bool(gram.diagonal().min() > 0):
        raise EditError(f"kᵀC⁻¹k = {float(gram.diagonal().min()):.3g} is not positive: the key statistics do not "
                        "fit this key")
    # The pseudo-inverse: two prompts with the same key (a repeated prompt) are one constraint, not a singular one.
    return solved @ (torch.linalg.pinv(gram, hermitian=True, rtol=1e-10) @ torch.ones(len(keys), dtype=torch.float64))


def weight_change(km, delta: torch.Tensor) -> torch.Tensor:
    """``delta`` [d_model, d_ff] in the orientation (and dtype) of the value projection's weight."""
    weight = km.value_weight(0)
    oriented = km.adapter.as_value_weight(delta.t())  # delta is [d_model, d_ff], nn.Linear's layout
    return oriented.to(weight.dtype).contiguous()
