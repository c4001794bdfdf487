"""Typed configuration: OmegaConf structured configs (dataclasses) merged with YAML files and dot-list
overrides, so a typo or a wrong type is an error naming the key. Nothing here runs at import time."""

from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence, TypeVar

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from ..errors import ConfigError

T = TypeVar("T")


def _read_yaml(path: Path):
    """A YAML file's top-level mapping; ConfigError (file:line) for bad syntax or another top-level type."""
    import yaml

    try:
        loaded = OmegaConf.load(path)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark is not None else str(path)
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"{where}: not valid YAML ({problem})") from exc
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not a UTF-8 text file") from exc
    if not OmegaConf.is_dict(loaded):
        kind = "a list" if OmegaConf.is_list(loaded) else type(loaded).__name__
        raise ConfigError(f"{path}: the top level must be a mapping of settings (key: value), not {kind}")
    return loaded


def load_config(schema: type[T], files: Sequence[str | Path] = (), overrides: Sequence[str] | Mapping = (),
                defaults: Mapping | None = None) -> T:
    """An instance of dataclass ``schema``: its defaults, then ``defaults``, then each YAML file, then
    ``key=value`` overrides (or a mapping of them)."""
    try:
        merged = OmegaConf.structured(schema)
        if defaults:
            merged = OmegaConf.merge(merged, dict(defaults))
        for file in files:
            path = Path(file)
            if not path.is_file():
                raise ConfigError(f"config file not found: {path}")
            merged = OmegaConf.merge(merged, _read_yaml(path))
        if isinstance(overrides, Mapping):
            return OmegaConf.to_object(OmegaConf.merge(merged, dict(overrides)))  # type: ignore[return-value]
        bad = [o for o in overrides if "=" not in o]
        if bad:
            raise ConfigError(f"overrides must look like key=value, got {bad}")
        if overrides:
            merged = OmegaConf.merge(merged, OmegaConf.from_dotlist(list(overrides)))
        return OmegaConf.to_object(merged)  # type: ignore[return-value]
    except OmegaConfBaseException as exc:
        raise ConfigError(f"invalid configuration: {describe(exc)}") from exc


def describe(exc: OmegaConfBaseException) -> str:
    """One line: the key at fault and OmegaConf's message (whose later lines repeat the key and types)."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    message = " ".join(line for line in lines if not line.startswith(("full_key:", "object_type=", "reference_type=")))
    key = getattr(exc, "full_key", None)
    return f"{key}: {message}" if key and key not in message else message


def to_yaml(config: object) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(config))
