"""The least-change solve that ROME, MEMIT and kn-subject share: the change D of a linear map (a value projection,
or some of its columns) of least cost on general text, tr(D C Dᵀ) with the key statistics C = E[k kᵀ], that moves
given keys k_j by given targets t_j:

    exact (λ = 0):  min tr(D C Dᵀ)  s.t.  D k_j = t_j          →  D = T (Kᵀ C⁻¹ K)⁺ (C⁻¹ K)ᵀ
    soft (λ > 0):   min λ tr(D C Dᵀ) + Σ_j ‖D k_j − t_j‖²      →  D = T (λ I + Kᵀ C⁻¹ K)⁻¹ (C⁻¹ K)ᵀ

with K = [k_1 … k_m] and T = [t_1 … t_m]. ROME's rank-one direction is the exact case with t_j = 1 (one row),
MEMIT's update (eq. 14, ΔW = R Kᵀ (λ C + K Kᵀ)⁻¹ by the push-through identity) the soft one, kn-subject's edit
of a few neurons the exact case on those neurons' block of C. One solve with C and an m × m system, never a
d_ff × d_ff inverse; given a memo (``factors``, kept with the statistics), C's LU factorization is made once and
each later solve with it is a pair of triangular solves (the same factorization and solve torch.linalg.solve
makes, so the same numbers). The pseudo-inverse makes repeated keys with one target one constraint (prompts that
start with the subject share its key), not a singular system.
"""

from __future__ import annotations

import torch

from ...errors import EditError

SINGULAR_HINT = "take the key statistics over more text (cov_tokens) or set cov_ridge > 0"


def least_change(mom2: torch.Tensor, keys: torch.Tensor, targets: torch.Tensor, ridge: float = 0.0,
                 penalty: torch.Tensor | None = None, softness: float = 0.0, check_exact: bool = True,
                 hint: str = SINGULAR_HINT, factors: dict | None = None) -> torch.Tensor:
    """D [d, n] float64 (see the module docstring). mom2: C [n, n] (symmetric positive definite); keys [m, n];
    targets [m, d]; ridge: C + ridge · mean(diag C) · I; penalty: [n, n] added to C after the ridge (so the ridge
    scales with C alone); softness: λ (0: every key moved exactly by its target). check_exact (λ = 0): refuse,
    rather than return, a D that misses a target (constraints that conflict). hint: what the user can do about a
    singular C, for the errors. factors: a memo of C's LU factorization per ridge, for solves with this C and no
    penalty (``KeyStatistics.memo``)."""
    a = keys.to(torch.float64).cpu().t()  # K [n, m]
    t = targets.to(torch.float64).cpu()  # [m, d]
    try:
        if factors is not None and penalty is None:
            if ("lu", ridge) not in factors:
                factors["lu", ridge] = torch.linalg.lu_factor(_ridged(mom2, ridge))
            c_inv_a = torch.linalg.lu_solve(*factors["lu", ridge], a)  # C⁻¹K [n, m]
        else:
            c = _ridged(mom2, ridge)
            if penalty is not None:
                c = c + penalty.to(torch.float64).cpu()
            c_inv_a = torch.linalg.solve(c, a)
    except RuntimeError as exc:  # torch.linalg.LinAlgError subclasses RuntimeError
        raise EditError(f"the key statistics are singular ({exc}); {hint}") from exc
    if not bool(torch.isfinite(c_inv_a).all()):
        raise EditError(f"the key statistics are singular; {hint}")
    gram = a.t() @ c_inv_a  # KᵀC⁻¹K [m, m], symmetric positive definite when the keys are independent
    gram = (gram + gram.t()) / 2
    if len(t) and not bool(gram.diagonal().min() > 0):
        raise EditError(f"kᵀC⁻¹k = {float(gram.diagonal().min()):.3g} is not positive: the key statistics do not fit "
                        f"this key; {hint}")
    if softness:
        gram = gram + softness * torch.eye(len(gram), dtype=gram.dtype)
    weights = torch.linalg.pinv(gram, hermitian=True, rtol=1e-10) @ t  # [m, d]
    out = (c_inv_a @ weights).t()  # [d, n]
    if not bool(torch.isfinite(out).all()):
        raise EditError(f"the least-change solve gave non-finite values; {hint}")
    if check_exact and not softness and len(t):
        missed = float((out @ a - t.t()).abs().max())
        if missed > 1e-5 * max(float(t.abs().max()), 1e-12):
            raise EditError(f"the least-change constraints are singular and conflict (two keys that are one asked for "
                            f"different targets); {hint}")
    return out


def exact_direction(mom2: torch.Tensor, keys: torch.Tensor, ridge: float = 0.0, factors: dict | None = None) -> torch.Tensor:
    """w [d_ff] float64 of least wᵀCw with wᵀk_j = 1 for every row k_j of ``keys`` [m, d_ff]
    (kn_edit/editing/rome/update.py derives it): :func:`least_change` with every target 1. One key:
    C⁻¹k / (kᵀC⁻¹k), the ROME paper's direction; another key k' gets the share wᵀk' of an update δ wᵀ.
    factors: C's factorization memo (``KeyStatistics.memo``)."""
    ones = torch.ones(len(keys), 1, dtype=torch.float64)
    # check_exact off: the pseudo-inverse's least-squares answer is the update even where keys nearly coincide
    return least_change(mom2, keys, ones, ridge, check_exact=False, factors=factors)[0]


def _ridged(mom2: torch.Tensor, ridge: float) -> torch.Tensor:
    """C + ridge · mean(diag C) · I, float64 on the CPU."""
    c = mom2.to(torch.float64).cpu()
    return c + ridge * c.diagonal().mean() * torch.eye(c.shape[0], dtype=c.dtype) if ridge else c


__all__ = ["SINGULAR_HINT", "least_change"]
