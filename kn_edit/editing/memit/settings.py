"""MEMIT's settings (``configs/methods/memit.yaml`` states the defaults) and the critical layers per model."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional

from ...errors import ConfigError, EditError
from ..keyvalue.settings import KeyFit, KeyValueSettings
from ..keyvalue.layer_choice import LayerChoice, measured_layers
from ..rome.settings import layer_choice as rome_layer_choice
from ..settings import as_choice

if TYPE_CHECKING:
    from ...models.model import KnModel

# (adapter family, n_layers, d_model) → critical layers R (0-based, ascending). smollm2-135m: five layers around
# ROME's layer 5 (its sweep: 3 edits more, 8 generalizes less), like MEMIT's five for GPT-2 XL (13–17 of 48) and
# six for GPT-J (3–8 of 28), which also reach a little past ROME's single layer.
DEFAULT_LAYERS: dict[tuple[str, int, int], list[int]] = {
    ("llama", 30, 576): [3, 4, 5, 6, 7],  # smollm2-135m
    ("gpt2", 48, 1600): [13, 14, 15, 16, 17],  # gpt2-xl (MEMIT)
}


def default_layers(km: KnModel) -> list[int]:
    """The critical layers for ``km`` when none are given (:func:`layer_choice`)."""
    return list(layer_choice(km).layers)


def layer_choice(km: KnModel) -> LayerChoice:
    """MEMIT's critical layers on ``km``: the range ``kn-edit choose-layer --method memit`` measured for this model,
    else the table above, else ROME's layer for the model (measured or not) and the two below it (clipped at 0): R
    ends at the layer ROME edits, as MEMIT's R ends at (or just past) ROME's layer."""
    measured = measured_layers(km, "memit")
    if measured is not None:
        return measured
    found = DEFAULT_LAYERS.get((km.adapter.family, km.n_layers, km.d_model))
    if found is not None:
        return LayerChoice(tuple(found), "table")
    rome = rome_layer_choice(km, "rome")
    top = rome.layers[0]
    return LayerChoice(tuple(range(max(0, top - 2), top + 1)), f"rule (the two layers below ROME's {rome.source} layer)")


@dataclass
class MemitSettings(KeyValueSettings):
    """MEMIT (Meng et al. 2023): for every layer l of R in turn, ΔW_l = R_l K_lᵀ (λ C_l + K_l K_lᵀ)⁻¹. Keys, z's δ
    (optimised as ROME's v*), statistics: :class:`KeyValueSettings`."""

    layers: Optional[list[int]] = None  # critical layers R, ascending; null: the model's default (DEFAULT_LAYERS)
    # keys each layer's update is solved for: mean (each request's prefix-averaged key, the paper) | prompts (also
    # each edit prompt's own key, with the request's residual) | rows (also every prefixed rewrite row's key)
    fit: KeyFit = KeyFit.mean
    # requests the solved update leaves short (the new object not top-1 on every edit prompt, with the edit applied
    # as a trial) are solved again with this fit, the others keeping theirs; null: one solve (the paper). prompts by
    # default: on smollm2 it edits more facts than one solve in one edit of 76 (92 % against 59 %), one at a time
    # (93 % against 68 %, neighbours kept as before) and after 100 in sequence (88 % held); in one edit of 76 it
    # keeps fewer other-object neighbours (86 % against 97 %; evaluations/README.md, batch and sequential sections)
    refit: Optional[KeyFit] = KeyFit.prompts
    # λ: weight of the preserved keys' statistics C = E[k kᵀ] against the batch's own keys. 15 by default: a layer
    # passes g / (λ + g) of its residual share (g = kᵀC⁻¹k ≈ d_ff), so the paper's ratio (λ ≈ d_ff: 1500 here)
    # under-reached; on smollm2 λ = 15 edits 95.8 % of 64 facts one at a time (89.1 % at 1500) and 22 of 22 in one
    # edit (87.9 %), every neighbour kept as at 1500 (evaluations/README.md, "Why MEMIT under-reaches")
    mom2_update_weight: float = 15.0
    # rounds of re-targeting: requests the edit (after the refit) still leaves short get their δ optimised again on
    # the edited model (z' = h^L there + δ', so the other requests' updates are part of what it corrects for), and
    # every layer is solved again from the targets; the rounds stop once no request is short. 0: never (the paper).
    # In one edit of many facts, requests whose targets the solve reaches (‖z − h^L‖ a few % of δ) can still fall
    # short because the other requests' updates move their prompts' other tokens. On smollm2: 95 facts in one edit
    # 92.6 → 100 %, 64 one at a time 95.8 → 100 %, neighbours kept as before (evaluations/README.md)
    retarget: int = 1

    def check(self) -> "MemitSettings":
        super().check()
        self.fit = as_choice(KeyFit, self.fit, "fit")
        if self.refit is not None:
            self.refit = as_choice(KeyFit, self.refit, "refit")
        if self.layers is not None:
            layers = list(self.layers)
            if not layers:
                raise ConfigError("layers must list at least one layer (or be null for the model's default)")
            if any(isinstance(l, bool) or not isinstance(l, int) or l < 0 for l in layers):
                raise ConfigError(f"layers must be layer numbers >= 0, got {layers}")
            if layers != sorted(set(layers)):
                raise ConfigError(f"layers must be ascending and distinct, got {layers}")
            self.layers = layers
        if isinstance(self.retarget, bool) or not isinstance(self.retarget, int) or self.retarget < 0:
            raise ConfigError(f"retarget must be a whole number >= 0, got {self.retarget!r}")
        if self.mom2_update_weight < 0:
            raise ConfigError(f"mom2_update_weight must be >= 0, got {self.mom2_update_weight}")
        return self

    def choice_for(self, km: KnModel) -> LayerChoice:
        """The critical layers and where they come from (the setting, a measured choice, the table, the rule)."""
        choice = layer_choice(km) if self.layers is None else LayerChoice(tuple(self.layers), "setting")
        if choice.layers[-1] >= km.n_layers:
            raise EditError(f"layer {choice.layers[-1]} does not exist: the model has {km.n_layers} layers "
                            f"(0..{km.n_layers - 1})")
        return choice

    def layers_for(self, km: KnModel) -> list[int]:
        return list(self.choice_for(km).layers)
