"""ROME (Meng et al. 2022, "Locating and Editing Factual Associations in GPT"), implemented from the paper:
a rank-one update of one layer's FFN value projection that maps the subject's key k* to a value v* making the
new object the answer. Modules: settings, update (the closed form), editor (RomeEditor); the keys (k*, context
prefixes), key statistics (C = E[k kᵀ], cached), v* and the least-change solve are the key-value machinery that
MEMIT and kn-subject share (kn_edit.editing.keyvalue)."""

from ..keyvalue.statistics import KeyStatistics, key_statistics
from .editor import RomeDetails, RomeEditor, RomeRequestDetails
from .settings import DEFAULT_LAYERS, KeyFit, KeyText, RomeSettings, default_layer

__all__ = [
    "DEFAULT_LAYERS", "KeyFit", "KeyStatistics", "KeyText", "RomeDetails", "RomeEditor", "RomeRequestDetails", "RomeSettings",
    "default_layer", "key_statistics",
]  # fmt: skip
