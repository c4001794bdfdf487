"""Editing methods behind one interface: every editor turns EditRequests into a revertible Edit."""

from .base import Edit, Editor, EditRequest, ParamPatch
from .finetune import FineTuneDetails, FineTuneEditor, FineTuneSettings
from .knowledge_neurons import (
    KnDetails,
    KnowledgeNeuronEditor,
    KnowledgeNeuronEraser,
    KnowledgeNeuronRelationEraser,
    KnRequestDetails,
    Located,
    default_locator,
    erase_fact,
    erase_relation,
)
from .front import default_method, update_fact
from .ledger import SliceChange, active_edits, commit, ledger_for
from .patchfile import apply_patch, read_patch, remove_patch, save_patch
from .registry import METHODS, make_editor, method_config, method_names
from .report import EditReport, ParameterChange, PromptOutcome
from .rules import RULES
from .settings import Direction, EraseMode, EraseSettings, LocateSettings, RelationEraseSettings, Rule, UpdateSettings
from .values import whole_change

__all__ = [
    "Direction",
    "EditReport",
    "FineTuneDetails",
    "FineTuneEditor",
    "FineTuneSettings",
    "EraseMode",
    "KnDetails",
    "KnRequestDetails",
    "KnowledgeNeuronRelationEraser",
    "METHODS",
    "ParameterChange",
    "PromptOutcome",
    "RelationEraseSettings",
    "Rule",
    "make_editor",
    "method_config",
    "method_names",
    "whole_change",
    "Edit",
    "EditRequest",
    "Editor",
    "EraseSettings",
    "KnowledgeNeuronEditor",
    "KnowledgeNeuronEraser",
    "LocateSettings",
    "Located",
    "ParamPatch",
    "RULES",
    "SliceChange",
    "UpdateSettings",
    "active_edits",
    "apply_patch",
    "commit",
    "default_method",
    "default_locator",
    "erase_fact",
    "erase_relation",
    "ledger_for",
    "read_patch",
    "remove_patch",
    "save_patch",
    "update_fact",
]
