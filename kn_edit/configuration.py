"""Typed configuration: OmegaConf structured configs (dataclasses) merged with YAML files and dot-list
overrides, so a typo or a wrong type is an error naming the key. Nothing here runs at import time."""

from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence, TypeVar

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from .errors import ConfigError

T = TypeVar("T")


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
            merged = OmegaConf.merge(merged, OmegaConf.load(path))
        if isinstance(overrides, Mapping):
            return OmegaConf.to_object(OmegaConf.merge(merged, dict(overrides)))  # type: ignore[return-value]
        bad = [o for o in overrides if "=" not in o]
        if bad:
            raise ConfigError(f"overrides must look like key=value, got {bad}")
        if overrides:
            merged = OmegaConf.merge(merged, OmegaConf.from_dotlist(list(overrides)))
        return OmegaConf.to_object(merged)  # type: ignore[return-value]
    except OmegaConfBaseException as exc:
        first = str(exc).splitlines()[0]
        key = getattr(exc, "full_key", None)  # OmegaConf names the key on a later line; keep it on this one
        where = f" (key {key})" if key and key not in first else ""
        raise ConfigError(f"invalid configuration: {first}{where}") from exc


def to_yaml(config: object) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(config))
