"""kn-edit: locate and edit factual knowledge in pretrained transformers.

Public API (stable names): ``load``, ``wrap``, ``KnModel``, ``Prediction``, the error classes, and the
adapter helpers. Importing kn_edit reads no config, sets no seeds and configures no logging.
"""

from .adapters import ADAPTERS, ArchitectureAdapter, adapter_from_paths, supported_model_types
from .errors import (
    ConfigError,
    DataError,
    EditError,
    KnEditError,
    PromptError,
    ProvisionError,
    TargetError,
    UnknownModelError,
    UnsupportedArchitectureError,
)
from .loading import load, wrap
from .model import KnModel, Prediction
from .provision import DEFAULT_MODEL, OFFLINE_MODELS

__version__ = "0.1.0"

__all__ = [
    "ADAPTERS",
    "ArchitectureAdapter",
    "ConfigError",
    "DataError",
    "DEFAULT_MODEL",
    "EditError",
    "KnEditError",
    "KnModel",
    "OFFLINE_MODELS",
    "Prediction",
    "PromptError",
    "ProvisionError",
    "TargetError",
    "UnknownModelError",
    "UnsupportedArchitectureError",
    "adapter_from_paths",
    "load",
    "supported_model_types",
    "wrap",
]
