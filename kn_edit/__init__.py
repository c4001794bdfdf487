"""kn-edit: locate and edit factual knowledge in pretrained transformers.

Public API (stable names): ``load``, ``wrap``, ``KnModel``, ``Prediction``, the error classes, and the
adapter helpers. Importing kn_edit reads no config, sets no seeds and configures no logging.
"""

from .models.adapters import ADAPTERS, ArchitectureAdapter, adapter_from_paths, supported_model_types
from .locating.attribution import attribute, attribute_prompts, attribute_steps
from .locating.dataset import DatasetResult, locate_dataset
from .editing import (
    Edit,
    EditRequest,
    EditReport,
    Editor,
    KnowledgeNeuronEditor,
    KnowledgeNeuronEraser,
    apply_patch,
    default_method,
    make_editor,
    method_names,
    erase_fact,
    erase_relation,
    remove_patch,
    update_fact,
)
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
from .models.loading import load, wrap
from .locating.locate import (
    AdaptiveShare,
    LocateConfig,
    LocateResult,
    LocateSettings,
    adaptive_share,
    locate,
    locate_detailed,
    relation_neurons,
)
from .locating.manipulate import amplify, suppress
from .locating.subject import SubjectGuess, find_subject
from .models.model import KnModel, Prediction
from .models.neurons import Neuron
from .locating.probe import ProbeResult, probe
from .models.prompts import token_limit
from .models.provision import DEFAULT_MODEL, OFFLINE_MODELS

__version__ = "0.1.0"

__all__ = [
    "Edit",
    "EditRequest",
    "EditReport",
    "Editor",
    "KnowledgeNeuronEditor",
    "LocateSettings",
    "make_editor",
    "method_names",
    "KnowledgeNeuronEraser",
    "apply_patch",
    "erase_fact",
    "erase_relation",
    "remove_patch",
    "update_fact",
    "default_method",
    "find_subject",
    "SubjectGuess",
    "AdaptiveShare",
    "LocateConfig",
    "LocateResult",
    "Neuron",
    "ProbeResult",
    "adaptive_share",
    "amplify",
    "locate",
    "locate_detailed",
    "locate_dataset",
    "relation_neurons",
    "DatasetResult",
    "probe",
    "suppress",
    "token_limit",
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
    "attribute",
    "attribute_prompts",
    "attribute_steps",
    "load",
    "supported_model_types",
    "wrap",
]
