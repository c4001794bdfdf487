"""Saving a (usually edited) model as a folder that :func:`kn_edit.load` reads back: safetensors weights,
config and tokenizer from Hugging Face's ``save_pretrained``, plus ``kn_edit.json`` recording which edits it
carries. Written atomically into a new folder; never over the folder the model was loaded from."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import EditError
from ..storage.atomic import atomic_dir, check_writable

if TYPE_CHECKING:
    from .model import KnModel

MANIFEST = "kn_edit.json"


def _inside(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def check_model_path(km: KnModel, path: str | Path) -> Path:
    """The resolved new folder ``path`` for saving ``km``; an EditError where it exists, overlaps the source or
    its folder is not writable. Callers check before long work so a bad path fails at once."""
    target = Path(path).expanduser().resolve()
    if km.source is not None and (_inside(target, km.source) or _inside(km.source, target)):
        raise EditError(f"{target} would overwrite {km.source}, the folder this model was loaded from; choose a new path")
    if target.exists():
        raise EditError(f"{target} already exists; choose a new path (nothing was written)")
    return check_writable(target)


def save_model(km: KnModel, path: str | Path) -> Path:
    """Write ``km`` to the new folder ``path`` and return it."""
    target = check_model_path(km, path)
    edits = [
        {"editor": e.editor, "requests": [{"prompts": list(r.prompts), "old": r.old, "new": r.new} for r in e.requests],
         "method": e.report.method if e.report else None,
         "neurons": [[n.layer, n.index] for n in e.report.neurons] if e.report else []}
        for e in km.active_edits
    ]
    with atomic_dir(target, what="model") as tmp:
        km.model.save_pretrained(str(tmp))  # safetensors is the default format
        km.tokenizer.save_pretrained(str(tmp))
        manifest = {"saved_by": "kn-edit", "base_model": km.name, "fingerprint": km.fingerprint(), "edits": edits}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, default=str) + "\n")
    return target
