"""Where a key-value editor edits when no layer is given: a layer measured for this model by ``kn-edit
choose-layer``, else the table of measured or published choices per architecture, else a depth rule.

``kn-edit choose-layer`` (kn_edit.evaluation.layer_sweep) edits facts the model knows at each candidate layer and
keeps the layer with the best edits and the fewest side effects; the choice is kept per model name and method in
``$KN_EDIT_CACHE/layers/MODEL.json`` with the sweep's table, and every later edit of that model by that method
(rome, kn-subject, memit) reads it. A record made for another architecture (another model under the same name) is
not used. Which source gave the layer is in the edit's details (``layer_source``).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

from ...errors import ConfigError
from ...models.provision import cache_root
from ...storage.atomic import atomic_file

if TYPE_CHECKING:
    from ...models.model import KnModel

METHODS = ("rome", "kn-subject", "memit")
FORMAT = 1


@dataclass(frozen=True)
class LayerChoice:
    """The layers an editor uses (one for rome and kn-subject, MEMIT's range) and where they come from:
    ``setting`` (given), ``measured`` (kn-edit choose-layer, ``path``), ``table`` or ``rule``."""

    layers: tuple[int, ...]
    source: str
    path: str | None = None

    def describe(self) -> str:
        where = f" ({self.path})" if self.path else ""
        return f"{self.source}{where}"


def choices_path(model_name: str, root: str | Path | None = None) -> Path:
    """The file holding a model's measured layers (one per method), in ``root`` (default
    ``$KN_EDIT_CACHE/layers``)."""
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", model_name).strip("._") or "model"
    return (Path(root) if root is not None else cache_root() / "layers") / f"{safe}.json"


def _signature(km: KnModel) -> list:
    return [km.adapter.family, km.n_layers, km.d_model]


def _read(path: Path) -> dict:
    if not path.exists():
        return {}
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{path}: not a readable layer-choice file ({exc}); delete it or run kn-edit "
                          "choose-layer again") from exc
    if not isinstance(data, dict) or data.get("format") != FORMAT or not isinstance(data.get("methods"), dict):
        raise ConfigError(f"{path}: not a kn-edit layer-choice file (format {FORMAT}); delete it or run kn-edit "
                          "choose-layer again")
    return data


def measured_layers(km: KnModel, method: str, root: str | Path | None = None) -> LayerChoice | None:
    """The layers ``kn-edit choose-layer`` measured for this model and method, or None (none measured, or
    measured for another architecture under this name)."""
    path = choices_path(km.name, root)
    data = _read(path)
    record = data.get("methods", {}).get(method)
    if record is None or data.get("architecture") != _signature(km):
        return None
    layers = record.get("layers")
    if (not isinstance(layers, list) or not layers or not all(isinstance(x, int) and 0 <= x < km.n_layers for x in layers)):
        raise ConfigError(f"{path}: method {method!r} has no valid layers ({layers!r}); delete it or run kn-edit "
                          "choose-layer again")
    return LayerChoice(tuple(layers), "measured", str(path))


def save_measured(km: KnModel, method: str, layers: Sequence[int], sweep: list[dict], about: dict,
                  root: str | Path | None = None) -> Path:
    """Keep ``layers`` as the model's measured choice for ``method`` (replacing an earlier one, keeping the other
    methods' unless they were made for another architecture), with the sweep's table; written atomically."""
    if method not in METHODS:
        raise ConfigError(f"choose-layer: method must be one of {', '.join(METHODS)}, got {method!r}")
    path = choices_path(km.name, root)
    data = _read(path)
    if data.get("architecture") != _signature(km):
        data = {}
    data.update(format=FORMAT, model=km.name, architecture=_signature(km))
    data.setdefault("methods", {})[method] = {"layers": [int(x) for x in layers], "sweep": sweep, **about}
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(path, overwrite=True, what="layer choice") as tmp:
        tmp.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
    return path


__all__ = ["LayerChoice", "METHODS", "choices_path", "measured_layers", "save_measured"]
