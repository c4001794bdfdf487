"""Null-space preservation (AlphaEdit, Fang et al., ICLR 2025), implemented from the paper: an update of a linear
map is projected onto the null space of the keys it should preserve, so its output on them does not move.

For a weight W [d_out, d_in] whose inputs ("keys") k [d_in] should keep their outputs, the preserved keys are
summarised by their second moment C = E[k kᵀ] [d_in, d_in]. Its eigenvectors with small eigenvalues span the
directions the preserved keys (almost) never take: P = Û Ûᵀ with Û the eigenvectors whose eigenvalue is below
``threshold`` × the largest one. Any update of the form ΔW = X P leaves W k unchanged for every k with P k = 0,
exactly where C has a true null space and to within the cut (√(threshold · λ_max) per unit of X) elsewhere.

The update (AlphaEdit's eq. for the sequential case), for new keys K [d_in, n] that should move by the residuals
R [d_out, n] and keys of earlier edits K_p [d_in, m] whose outputs should stay:

    ΔW = R Kᵀ P (K_p K_pᵀ P + K Kᵀ P + α I)⁻¹

the minimiser of ‖ΔW K − R‖² + ‖ΔW K_p‖² + α ‖ΔW‖² over ΔW = X P; it lies in the projected space (ΔW = ΔW P),
so ΔW k = 0 for the preserved null-space keys. α: ``ridge`` × mean(diag C), so the setting does not depend on
the keys' scale (the paper's I is α = 1 for its models' unnormalised keys). K_p is a soft term, as in the paper:
earlier edits' keys are kept as far as the new ones allow, not exactly.

The knowledge-neuron gradient solve works in the edited neurons' coordinates: a change δ [n, d_model] of their
value vectors moves the FFN output by δᵀ a(x) at a token with activations a(x) [n], so the same projector, built
from the neurons' co-activation over preserved tokens ([n, n]), is applied along the neuron axis.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from ..errors import EditError

if TYPE_CHECKING:
    from ..models.model import KnModel


@dataclass
class NullSpace:
    """P [d, d] float64 (CPU): the projector onto the null space of the preserved keys, P = Û Ûᵀ with the
    orthonormal basis Û [d, kept]; kept / total dims."""

    projector: torch.Tensor
    basis: torch.Tensor
    kept: int
    total: int
    threshold: float
    scale: float  # mean(diag C), the unit of the ridge


def check_null_space(settings) -> None:
    """The null-space settings shared by ROME, MEMIT and the knowledge-neuron editor (ConfigError by key)."""
    from ..errors import ConfigError

    if not 0.0 < settings.null_space_threshold <= 1.0:
        raise ConfigError(f"null_space_threshold must be in (0, 1], got {settings.null_space_threshold}")
    ridge = getattr(settings, "null_space_ridge", 1.0)
    if not ridge > 0:
        raise ConfigError(f"null_space_ridge must be > 0, got {ridge}")


def null_space(second_moment: torch.Tensor, threshold: float) -> NullSpace:
    """The projector onto the eigenvectors of C = ``second_moment`` [d, d] (symmetric, PSD) whose eigenvalue is
    below ``threshold`` × the largest. EditError when there are none (raise the threshold)."""
    c = second_moment.detach().to("cpu", torch.float64)
    c = (c + c.T) / 2
    values, vectors = torch.linalg.eigh(c)  # ascending
    top = float(values[-1].clamp(min=0.0))
    keep = values <= threshold * top if top > 0 else torch.ones_like(values, dtype=torch.bool)
    kept = int(keep.sum())
    if kept == 0:
        raise EditError(f"the preserved keys leave no null space at null_space_threshold={threshold:g} (smallest "
                        f"eigenvalue {float(values[0]) / max(top, 1e-300):.2g} × the largest); raise the threshold")
    basis = vectors[:, keep]  # [d, kept]
    return NullSpace(basis @ basis.T, basis, kept, len(values), threshold, float(c.diagonal().mean()))


def projected_update(residuals: torch.Tensor, keys: torch.Tensor, space: NullSpace, ridge: float,
                     preserved: torch.Tensor | None = None) -> torch.Tensor:
    """ΔW [d_out, d_in] float64 = R Kᵀ P (K_p K_pᵀ P + K Kᵀ P + α I)⁻¹ (module docstring).

    residuals R [d_out, n], keys K [d_in, n], preserved K_p [d_in, m] or None, ridge: α in units of mean(diag C).

    Solved in the null space's own coordinates: with ΔW = Y Ûᵀ the minimiser is Y = R Kᵀ Û (Ûᵀ G Û + α I)⁻¹,
    G = K Kᵀ + K_p K_pᵀ, the same ΔW as the formula above (tested against it) from a [kept, kept] system instead
    of a [d_in, d_in] one (526 instead of 1536 on smollm2's layer 5), and exactly in the projected space.
    """
    u = space.basis  # [d_in, kept]
    r, k = residuals.detach().to("cpu", torch.float64), keys.detach().to("cpu", torch.float64)
    ku = u.T @ k  # [kept, n]: the keys in the null space's coordinates
    gram = ku @ ku.T  # Ûᵀ K Kᵀ Û
    if preserved is not None and preserved.numel():
        kpu = u.T @ preserved.detach().to("cpu", torch.float64)
        gram = gram + kpu @ kpu.T
    alpha = ridge * space.scale
    system = gram + alpha * torch.eye(len(gram), dtype=torch.float64)  # symmetric
    rhs = r @ ku.T  # [d_out, kept]
    try:
        y = torch.linalg.solve(system, rhs.T).T  # Y · system = rhs
    except RuntimeError as exc:  # singular: α = 0 and the keys do not reach the null space
        raise EditError(f"the null-space update is singular ({exc}); set null_space_ridge > 0") from exc
    if not bool(torch.isfinite(y).all()):
        raise EditError("the null-space update is not finite; set null_space_ridge > 0 or raise null_space_threshold")
    return y @ u.T


def neuron_projector(coactivation: torch.Tensor, threshold: float) -> torch.Tensor:
    """P [n, n] float32 for the knowledge-neuron solve: the null space of the neurons' co-activation [n, n]."""
    return null_space(coactivation, threshold).projector.float()


def project_neurons(projector: torch.Tensor, tensor: torch.Tensor) -> torch.Tensor:
    """P applied along the neuron axis of ``tensor`` [..., n, d_model] (value-vector changes or gradients)."""
    return torch.einsum("ij,...jd->...id", projector.to(tensor.dtype), tensor)


def edited_keys(km: KnModel, layer: int) -> torch.Tensor | None:
    """[m, d_in] float64: the keys of layer ``layer`` that the model's active ROME, MEMIT and kn-subject edits
    wrote, read from their reports (ROME, kn-subject: each request's k*; MEMIT: each layer's keys), so a sequence
    of edits carries them
    without any state in the editor, and a reverted edit's keys are no longer held."""
    from .ledger import active_edits

    found = []
    for edit in active_edits(km):
        details = getattr(edit.report, "details", None) if edit.report is not None else None
        by_layer = getattr(details, "keys_by_layer", None)
        if callable(by_layer):  # MEMIT
            keys = by_layer().get(layer)
            if keys is not None:
                found.append(keys)
        elif getattr(details, "layer", None) == layer and hasattr(details, "requests"):  # ROME, kn-subject
            found += [r.key[None] for r in details.requests if getattr(r, "key", None) is not None]
    return torch.cat([k.to(torch.float64).cpu() for k in found]) if found else None


def null_space_delta(km: KnModel, layer: int, mom2: torch.Tensor, residuals: torch.Tensor, keys: torch.Tensor,
                     threshold: float, ridge: float, earlier: torch.Tensor | None = None,
                     space: NullSpace | None = None) -> tuple[torch.Tensor, NullSpace]:
    """(ΔW [d_model, d_ff] float64, the null space) of layer ``layer`` for ROME or MEMIT with null_space on:
    keys K [d_ff, n] moved by residuals R [d_model, n]; preserved: the null space of C = ``mom2`` and, softly,
    the keys of the model's active ROME/MEMIT edits of this layer plus ``earlier`` [m, d_ff] (keys of the same
    call's earlier requests). ``space``: the null space of ``mom2`` at ``threshold`` if already computed."""
    space = space if space is not None else null_space(mom2, threshold)
    held = [k for k in (edited_keys(km, layer), earlier) if k is not None and k.numel()]
    preserved = torch.cat([k.to(torch.float64).cpu() for k in held]).T if held else None  # [d_ff, m]
    return projected_update(residuals, keys, space, ridge, preserved), space
