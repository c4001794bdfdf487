"""Editing methods by name. Every method is an :class:`Editor` subclass with a structured config dataclass
(``config_class``); a name here is the editor's import path plus the settings that make the variant (e.g.
``kn-paper`` is the knowledge-neuron editor with ``rule=paper``). Users' own editors are named
``module:Class``. ``configs/methods/<name>.yaml`` states each method's defaults.

Editor constructors share one shape: ``Editor(settings: config_class | None = None, *, reporter=None,
**overrides)``; method-specific extras (e.g. the knowledge-neuron editors' ``neurons=``) are keyword-only.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

from ..errors import ConfigError
from .base import Editor


@dataclass(frozen=True)
class MethodSpec:
    name: str
    target: str  # "module:Class"
    summary: str
    presets: dict[str, Any] = field(default_factory=dict)  # settings that make this variant
    subject: bool = False  # reads the fact's subject (the key at its last token): found from the prompts if not given


_KN = "kn_edit.editing.knowledge_neurons"
METHODS: dict[str, MethodSpec] = {
    spec.name: spec
    for spec in (
        MethodSpec("kn", f"{_KN}:KnowledgeNeuronEditor",
                   "knowledge neurons, signed least-change rule (the default for masked LMs)"),
        MethodSpec("kn-paper", f"{_KN}:KnowledgeNeuronEditor", "knowledge neurons, the paper's rule (λ1 = 1, λ2 = 8)",
                   {"rule": "paper"}),
        MethodSpec("kn-unscaled", f"{_KN}:KnowledgeNeuronEditor", "knowledge neurons, ±2·E rule of public toolkits",
                   {"rule": "unscaled"}),
        MethodSpec("kn-erase", f"{_KN}:KnowledgeNeuronEraser", "erase a fact: its knowledge neurons' value vectors to 0"),
        MethodSpec("kn-erase-relation", f"{_KN}:KnowledgeNeuronRelationEraser",
                   "erase a relation: neurons shared by >= 10 % of its facts to 0"),
        MethodSpec("rome", "kn_edit.editing.rome:RomeEditor",
                   "ROME (Meng et al. 2022): rank-one update of one layer's FFN value projection", subject=True),
        MethodSpec("memit", "kn_edit.editing.memit:MemitEditor",
                   "MEMIT (Meng et al. 2023): many facts at once, spread over a range of layers' FFN value projections",
                   subject=True),
        MethodSpec("kn-subject", "kn_edit.editing.subject_neurons:SubjectNeuronEditor",
                   "knowledge neurons at the subject's last token, least change on general text (subject-specific; the "
                   "default for causal LMs)", subject=True),
        MethodSpec("ft", "kn_edit.editing.finetune:FineTuneEditor",
                   "FT-L: fine-tune one layer's FFN value projection under an L-infinity bound"),
        MethodSpec("ft-m", "kn_edit.editing.finetune:FineTuneEditor",
                   "FT-M: as ft, loss on the object's tokens only (masked)", {"loss": "masked"}),
    )
}


def needs_subject(name: str) -> bool:
    """Whether method ``name`` reads the fact's subject (a user's ``module:Class`` says so with a class attribute
    ``needs_subject = True``)."""
    spec = METHODS.get(name)
    return spec.subject if spec is not None else bool(getattr(resolve(name)[0], "needs_subject", False))


def method_names() -> list[str]:
    return list(METHODS)


def _import(target: str) -> type:
    module_name, _, attr = target.partition(":")
    if not module_name or not attr:
        raise ConfigError(f"{target!r} is neither a method name ({', '.join(METHODS)}) nor module:Class")
    try:
        obj = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise ConfigError(f"cannot import editor {target!r}: {exc}") from exc
    if not (isinstance(obj, type) and issubclass(obj, Editor)):
        raise ConfigError(f"{target!r} is not an editor (a subclass of kn_edit.editing.Editor)")
    return obj


def resolve(name: str) -> tuple[type[Editor], dict[str, Any], str]:
    """(editor class, presets, display name) of a registry name or ``module:Class``."""
    if not isinstance(name, str) or not name:
        raise ConfigError(f"a method name is needed ({', '.join(METHODS)}, or module:Class)")
    spec = METHODS.get(name)
    if spec is not None:
        return _import(spec.target), dict(spec.presets), spec.name
    if ":" not in name:
        raise ConfigError(f"unknown method {name!r}; known: {', '.join(METHODS)} (or module:Class for your own editor)")
    return _import(name), {}, name


def method_config(name: str, files: Sequence[str | Path] = (), overrides: Sequence[str] | Mapping = ()) -> Any:
    """The settings of method ``name``: its config dataclass's defaults, the method's presets, each YAML file,
    then ``key=value`` overrides (or a mapping). Typos and bad values are ConfigErrors naming the key."""
    from ..storage.config import load_config

    cls, presets, _ = resolve(name)
    schema = getattr(cls, "config_class", None)
    if schema is None:
        raise ConfigError(f"editor {name!r} declares no config_class (a dataclass of its settings)")
    config = load_config(schema, files, overrides, defaults=presets)
    check = getattr(config, "check", None)
    return check() if callable(check) else config


def make_editor(name: str, files: Sequence[str | Path] = (), overrides: Sequence[str] | dict = (), **extras) -> Editor:
    """An editor of method ``name`` with its settings (see :func:`method_config`); ``extras`` go to the
    constructor as keywords (e.g. ``reporter=``, or ``neurons=`` for the knowledge-neuron editors)."""
    cls, _, display = resolve(name)
    config = method_config(name, files, overrides)
    try:
        editor = cls(config, **extras)
    except TypeError as exc:
        raise ConfigError(f"{display}: {exc}") from exc
    return editor
