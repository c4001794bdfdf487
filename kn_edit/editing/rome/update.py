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
and a quarter of the edits failed on them (evaluations/results/rome_check.md). With ``fit_subject_start`` K also
holds the key of the subject alone at the start of a text (kn_edit.editing.keyvalue.keys.start_text), the key of
every prompt that begins with the subject. The direction is computed by kn_edit.editing.keyvalue.solve.exact_direction,
shared with the start key's cost and the nearest names' shares.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from ...models.model import KnModel




def weight_change(km: KnModel, delta: torch.Tensor) -> torch.Tensor:
    """``delta`` [d_model, d_ff] in the orientation (and dtype) of the value projection's weight."""
    weight = km.value_weight(0)
    oriented = km.adapter.as_value_weight(delta.t())  # delta is [d_model, d_ff], nn.Linear's layout
    return oriented.to(weight.dtype).contiguous()
