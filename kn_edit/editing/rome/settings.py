"""ROME's settings (``configs/methods/rome.yaml`` states the defaults) and the edited layer per model."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar, Optional

from ...errors import ConfigError, EditError
from ..keyvalue.layer_choice import LayerChoice, measured_layers
from ..keyvalue.settings import KeyFit, KeyText, KeyValueSettings
from ..settings import as_choice

if TYPE_CHECKING:
    from ...models.model import KnModel

__all__ = ["DEFAULT_LAYERS", "KeyFit", "KeyText", "RomeSettings", "default_layer", "layer_choice"]



# (adapter family, n_layers, d_model) → edited layer (0-based). GPT-2 medium / large / XL: the layers ROME's
# causal tracing chose (Meng et al. 2022); smollm2-135m: the reference sweep of issue 9 (layer 5 of 30, also
# the layer commonly used for LLaMA models; evaluations/results/rome_layers: on 8 facts layer 3 edits more and
# keeps fewer same-object neighbours, layer 8 generalizes less); the others by the rule below
# (see configs/methods/rome.yaml).
DEFAULT_LAYERS: dict[tuple[str, int, int], int] = {
    ("llama", 30, 576): 5,  # smollm2-135m (also kn-edit choose-layer, layers 2-10 on 7 facts: results/layers_smollm2_rome)
    ("gemma3", 18, 640): 3,  # gemma3-270m: kn-edit choose-layer, layers 2-8 on 7 facts (results/layers_gemma3_rome)
    ("gpt2", 12, 768): 4,  # gpt2 (rule: a third of the depth, as ROME's choices for the larger GPT-2s)
    ("gpt2", 24, 1024): 8,  # gpt2-medium (ROME)
    ("gpt2", 36, 1280): 12,  # gpt2-large (ROME)
    ("gpt2", 48, 1600): 17,  # gpt2-xl (ROME)
}


def default_layer(km: KnModel) -> int:
    """The edited layer for ``km``: the table above, else a third of the depth for GPT-2-like models (ROME's
    choices for GPT-2) and a sixth for the others (LLaMA-7B: 5 of 32; smollm2: 5 of 30). Never the last layer:
    the subject comes before the answer, so its last token reaches the answer only through later layers."""
    return _table_or_rule(km).layers[0]


def _table_or_rule(km: KnModel) -> LayerChoice:
    found = DEFAULT_LAYERS.get((km.adapter.family, km.n_layers, km.d_model))
    if found is not None:
        return LayerChoice((found,), "table")
    share = 1 / 3 if km.adapter.family == "gpt2" else 1 / 6
    return LayerChoice((max(0, min(km.n_layers - 2, round(km.n_layers * share))),), "rule")


def layer_choice(km: KnModel, method: str = "rome") -> LayerChoice:
    """The layer ``method`` (rome, kn-subject) edits on ``km`` when none is given: the one ``kn-edit
    choose-layer`` measured for this model (kn_edit.editing.keyvalue.layer_choice), else :func:`default_layer`."""
    return measured_layers(km, method) or _table_or_rule(km)


@dataclass
class RomeSettings(KeyValueSettings):
    """ROME (Meng et al. 2022): a rank-one update of one layer's FFN value projection W,
    W ← W + Λ (C⁻¹k*)ᵀ, Λ = (v* − W k*) / ((C⁻¹k*)ᵀ k*). Keys, v*, statistics: :class:`KeyValueSettings`."""

    # edited layer; null: the one kn-edit choose-layer measured for the model, else DEFAULT_LAYERS, else the rule
    layer: Optional[int] = None
    fit: KeyFit = KeyFit.prompts  # keys mapped exactly to their value + δ: mean (paper: k* only) | prompts | rows

    def check(self) -> "RomeSettings":
        super().check()
        self.fit = as_choice(KeyFit, self.fit, "fit")
        if self.layer is not None and (isinstance(self.layer, bool) or self.layer < 0):
            raise ConfigError(f"layer must be >= 0 (or null for the model's default), got {self.layer}")
        return self

    measured_as: ClassVar[str] = "rome"  # whose measured layer (kn-edit choose-layer --method) this method uses

    def choice_for(self, km: KnModel) -> LayerChoice:
        """The edited layer and where it comes from (the setting, a measured choice, the table, the rule)."""
        choice = layer_choice(km, self.measured_as) if self.layer is None else LayerChoice((self.layer,), "setting")
        layer = choice.layers[0]
        if layer >= km.n_layers:
            raise EditError(f"layer {layer} does not exist: the model has {km.n_layers} layers (0..{km.n_layers - 1})")
        return choice

    def layer_for(self, km: KnModel) -> int:
        return self.choice_for(km).layers[0]
