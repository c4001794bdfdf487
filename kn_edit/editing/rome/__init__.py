"""ROME (Meng et al. 2022, "Locating and Editing Factual Associations in GPT"), implemented from the paper:
a rank-one update of one layer's FFN value projection that maps the subject's key k* to a value v* making the
new object the answer. Modules: keys (k*, context prefixes), covariance (C = E[k kᵀ], cached; reusable by
MEMIT), values (v*), update (the closed form), editor (RomeEditor)."""

from .covariance import KeyStatistics, key_statistics
from .editor import RomeDetails, RomeEditor, RomeRequestDetails
from .settings import DEFAULT_LAYERS, KeyFit, KeyText, RomeSettings, default_layer

__all__ = [
    "DEFAULT_LAYERS", "KeyFit", "KeyStatistics", "KeyText", "RomeDetails", "RomeEditor", "RomeRequestDetails", "RomeSettings",
    "default_layer", "key_statistics",
]  # fmt: skip
