"""MEMIT (Meng et al. 2023, "Mass-Editing Memory in a Transformer"), implemented from the paper: many facts in one
edit, spread over a range of critical layers. Modules: settings (MemitSettings, critical layers per model), hidden
(the residual h^L at the subject), solve (the batch update), editor (MemitEditor). Keys, key statistics, the
target optimisation and the least-change solve are the shared key-value machinery (kn_edit.editing.keyvalue)."""

from .editor import MemitDetails, MemitEditor, MemitLayerDetails, MemitRequestDetails
from .settings import DEFAULT_LAYERS, MemitSettings, default_layers
from .solve import memit_delta

__all__ = ["DEFAULT_LAYERS", "MemitDetails", "MemitEditor", "MemitLayerDetails", "MemitRequestDetails", "MemitSettings",
           "default_layers", "memit_delta"]
