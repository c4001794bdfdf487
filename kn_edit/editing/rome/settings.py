"""ROME's settings (``configs/methods/rome.yaml`` states the defaults) and the edited layer per model."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from ...errors import ConfigError, EditError
from ..nullspace import check_null_space
from ..settings import Choice, as_choice


class KeyText(Choice):
    """What k* is averaged over (always at the subject's last token, after each context prefix).

    subject: the prefix followed by the subject alone, k(x_j + s) as in the paper (eq. 3).
    prompts: the prefix followed by each edit prompt cut after the subject (the keys the edit prompts produce).
    """

    subject = "subject"
    prompts = "prompts"


class KeyFit(Choice):
    """Which keys the rank-one update gives the whole shift δ (kn_edit/editing/rome/update.py).

    mean: k* only, the paper's update (eq. 2); another key k gets the share wᵀk of δ.
    prompts: k* and the key of each edit prompt as it is (no prefix).
    rows: k* and the key of every rewrite row v* was optimised on (each edit prompt after each prefix).
    """

    mean = "mean"
    prompts = "prompts"
    rows = "rows"


# (adapter family, n_layers, d_model) → edited layer (0-based). GPT-2 medium / large / XL: the layers ROME's
# causal tracing chose (Meng et al. 2022); smollm2-135m: the reference sweep of issue 9 (layer 5 of 30, also
# the layer commonly used for LLaMA models; evaluations/results/rome_layers: on 8 facts layer 3 edits more and
# keeps fewer same-object neighbours, layer 8 generalizes less); the others by the rule below
# (see configs/methods/rome.yaml).
DEFAULT_LAYERS: dict[tuple[str, int, int], int] = {
    ("llama", 30, 576): 5,  # smollm2-135m
    ("gemma3", 18, 640): 3,  # gemma3-270m (rule; not swept)
    ("gpt2", 12, 768): 4,  # gpt2 (rule: a third of the depth, as ROME's choices for the larger GPT-2s)
    ("gpt2", 24, 1024): 8,  # gpt2-medium (ROME)
    ("gpt2", 36, 1280): 12,  # gpt2-large (ROME)
    ("gpt2", 48, 1600): 17,  # gpt2-xl (ROME)
}


def default_layer(km) -> int:
    """The edited layer for ``km``: the table above, else a third of the depth for GPT-2-like models (ROME's
    choices for GPT-2) and a sixth for the others (LLaMA-7B: 5 of 32; smollm2: 5 of 30). Never the last layer:
    the subject comes before the answer, so its last token reaches the answer only through later layers."""
    found = DEFAULT_LAYERS.get((km.adapter.family, km.n_layers, km.d_model))
    if found is not None:
        return found
    share = 1 / 3 if km.adapter.family == "gpt2" else 1 / 6
    return max(0, min(km.n_layers - 2, round(km.n_layers * share)))


@dataclass
class RomeSettings:
    """ROME (Meng et al. 2022): a rank-one update of one layer's FFN value projection W,
    W ← W + Λ (C⁻¹k*)ᵀ, Λ = (v* − W k*) / ((C⁻¹k*)ᵀ k*)."""

    layer: Optional[int] = None  # edited layer; null: the model's default (DEFAULT_LAYERS, else the rule)
    # k*: the value projection's input at the subject's last token, averaged over context prefixes
    key_text: KeyText = KeyText.subject  # subject (paper: prefix + subject) | prompts (prefix + edit prompt)
    fit: KeyFit = KeyFit.prompts  # keys mapped exactly to their value + δ: mean (paper: k* only) | prompts | rows
    n_prefixes: int = 5  # context prefixes sampled from the model (plus the empty prefix)
    prefix_length: int = 10  # tokens per prefix
    prefix_top_k: int = 5  # prefixes are sampled from the model's top-k next tokens ...
    prefix_seed: int = 0  # ... with this seed (so an edit is reproducible)
    # v*: the FFN output at the subject's last token that makes new the answer (Adam on δ = v* − W k*)
    lr: float = 0.5
    steps: int = 25  # at most this many Adam steps ...
    stop_loss: float = 0.05  # ... stopping early once the mean per-token NLL of new is below this
    kl_factor: float = 0.0625  # weight of KL(P_edited || P_original) after "{subject} is a"
    weight_decay: float = 0.5  # weight of ‖δ‖² / ‖W k*‖²
    clamp_norm_factor: float = 4.0  # ‖δ‖ is kept ≤ this × ‖W k*‖ (the paper's norm constraint)
    # C = E[k kᵀ]: second moment of layer's keys over generic text (computed once, cached on disk)
    cov_corpus: str = "wikipedia"  # wikipedia (the key slice, kn_edit/data/text.py) or a UTF-8 text file
    cov_tokens: int = 50000  # tokens of text the statistics are taken over
    cov_max_length: int = 128  # each passage cut at this many tokens
    cov_batch_size: int = 16
    cov_ridge: float = 0.0  # C + ridge · mean(diag C) · I before solving (0: C as estimated)
    cache: bool = True  # read / write the statistics under cache_dir
    cache_dir: Optional[str] = None  # null: $KN_EDIT_CACHE/rome
    # AlphaEdit: the update projected onto the null space of the preserved keys (kn_edit.editing.nullspace)
    null_space: bool = False
    null_space_threshold: float = 0.01  # eigenvalues of C below this × the largest span the null space
    null_space_ridge: float = 0.1  # α in (K_p K_pᵀ P + k kᵀ P + α I)⁻¹, in units of mean(diag C)

    def check(self) -> "RomeSettings":
        self.key_text = as_choice(KeyText, self.key_text, "key_text")
        self.fit = as_choice(KeyFit, self.fit, "fit")
        if self.layer is not None and (isinstance(self.layer, bool) or self.layer < 0):
            raise ConfigError(f"layer must be >= 0 (or null for the model's default), got {self.layer}")
        for key in ("n_prefixes", "steps", "cov_max_length", "cov_batch_size"):
            minimum = 0 if key == "n_prefixes" else 1
            if getattr(self, key) < minimum:
                raise ConfigError(f"{key} must be >= {minimum}, got {getattr(self, key)}")
        if self.n_prefixes and self.prefix_length < 1:
            raise ConfigError(f"prefix_length must be >= 1, got {self.prefix_length}")
        if self.prefix_top_k < 1:
            raise ConfigError(f"prefix_top_k must be >= 1, got {self.prefix_top_k}")
        if self.cov_tokens < 1:
            raise ConfigError(f"cov_tokens must be >= 1, got {self.cov_tokens}")
        for key in ("lr", "clamp_norm_factor"):
            if not getattr(self, key) > 0:
                raise ConfigError(f"{key} must be > 0, got {getattr(self, key)}")
        for key in ("stop_loss", "kl_factor", "weight_decay", "cov_ridge"):
            if getattr(self, key) < 0:
                raise ConfigError(f"{key} must be >= 0, got {getattr(self, key)}")
        if not isinstance(self.cov_corpus, str) or not self.cov_corpus.strip():
            raise ConfigError("cov_corpus must be 'wikipedia' or the path of a text file")
        check_null_space(self)
        return self

    def layer_for(self, km) -> int:
        layer = default_layer(km) if self.layer is None else self.layer
        if layer >= km.n_layers:
            raise EditError(f"layer {layer} does not exist: the model has {km.n_layers} layers (0..{km.n_layers - 1})")
        return layer
