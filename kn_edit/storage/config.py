"""Typed configuration: OmegaConf structured configs (dataclasses) merged with YAML files and dot-list
overrides, so a typo, a wrong type or a NaN is an error naming the key. Nothing here runs at import time."""

from __future__ import annotations

import math
import re
from dataclasses import fields, is_dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence, TypeVar, get_args, get_type_hints

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from ..errors import ConfigError

T = TypeVar("T")

# Metadata of a float field where an infinity is a meaningful value (e.g. ``norm_bound: .inf``, no bound):
# ``field(default=..., metadata=INF_ALLOWED)``. NaN is refused there too; the field's own check sets the range.
INF_ALLOWED = {"inf_allowed": True}


def finite(value: float, key: str) -> float:
    """``value``, or a ConfigError naming ``key`` when it is not a number or is NaN or infinite."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ConfigError(f"{key} must be a finite number, got {value!r}")
    return value


def check_finite(config: Any, prefix: str = "") -> None:
    """ConfigError naming the key of the first NaN or infinity in a number field of ``config`` (a dataclass),
    also inside Optional, lists, dicts and nested dataclasses. NaN passes every range check (its comparisons are
    all false) and infinity most of them, and either would only surface as NaN results or a failure deep inside
    a solve. Fields typed Any (e.g. another schema's settings, checked when that schema is built) are skipped."""
    try:
        hints = get_type_hints(type(config))
    except Exception:  # annotations that do not resolve (a user's editor config): read their text
        hints = {}
    for f in fields(config):
        numeric = _numeric(hints.get(f.name, f.type))
        _check_value(getattr(config, f.name), prefix + f.name, numeric, bool(f.metadata.get("inf_allowed")))


def _numeric(annotation: Any) -> bool:
    """Whether a field of this type may hold a number (float or int, also as a type argument)."""
    if isinstance(annotation, str):
        return re.search(r"\b(float|int)\b", annotation) is not None
    return annotation in (float, int) or any(_numeric(a) for a in get_args(annotation))


def _check_value(value: Any, key: str, numeric: bool, inf_allowed: bool) -> None:
    if is_dataclass(value) and not isinstance(value, type):
        check_finite(value, key + ".")
    elif isinstance(value, Mapping):
        for k, v in value.items():
            _check_value(v, f"{key}.{k}", numeric, inf_allowed)
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            _check_value(v, f"{key}[{i}]", numeric, inf_allowed)
    elif numeric and isinstance(value, float) and not math.isfinite(value):
        if not inf_allowed:
            finite(value, key)
        elif math.isnan(value):
            raise ConfigError(f"{key} must be a number (.inf allowed), got nan")


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
    ``key=value`` overrides (or a mapping of them). A NaN or infinite number is a ConfigError (check_finite)."""
    config = _merged(schema, files, overrides, defaults)
    check_finite(config)
    return config


def _merged(schema: type[T], files: Sequence[str | Path], overrides: Sequence[str] | Mapping,
            defaults: Mapping | None) -> T:
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
