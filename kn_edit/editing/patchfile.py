"""Patch files: an edit as a small safetensors file (for each touched parameter, the touched rows' indices and
their values before and after) with JSON metadata (format version, the model's name and fingerprint, the
editor and what it did). Written atomically; applied to, and removed from, a freshly loaded model.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import EditError
from ..persist import atomic_file
from .base import Edit
from .ledger import SliceChange, commit
from .report import EditReport, parameter_changes


@dataclass
class PatchDetails:
    """The report details of applying (or removing) a patch file."""

    path: str
    action: str  # apply | remove
    model: str | None  # the model the patch was made on
    editor: str | None  # the method that made it
    report: dict | None  # that edit's report, as saved

FORMAT = "kn-edit-patch"
VERSION = 1
_META_KEY = "kn_edit_patch"


def save_patch(edit: Edit, path: str | Path) -> Path:
    """Write ``edit`` to ``path`` (refuses an existing path; nothing is left behind on failure)."""
    from safetensors.torch import save_file

    if not edit.patches:
        raise EditError("the edit has no patches to save")
    tensors: dict[str, torch.Tensor] = {}
    params = []
    for i, p in enumerate(edit.patches):
        tensors[f"{i}.index"] = p.index.to(torch.long).contiguous()
        tensors[f"{i}.before"] = p.before.contiguous()
        tensors[f"{i}.after"] = p.after.contiguous()
        params.append({"name": p.name, "dim": p.dim, "rows": int(p.index.numel())})
    km = edit.model
    meta = {
        "format": FORMAT,
        "version": VERSION,
        "model": km.name,
        "fingerprint": km.fingerprint(),
        "editor": edit.editor,
        "requests": [{"prompts": list(r.prompts), "old": r.old, "new": r.new, "subject": r.subject,
                      "relation": r.relation} for r in edit.requests],
        "params": params,
        "report": edit.report.to_dict() if edit.report is not None else None,
    }
    path = Path(path)
    with atomic_file(path) as tmp:
        save_file(tensors, str(tmp), metadata={_META_KEY: json.dumps(meta, default=str)})
    return path


def read_patch(path: str | Path) -> tuple[dict, list[tuple[str, int, torch.Tensor, torch.Tensor, torch.Tensor]]]:
    """(metadata, [(param name, dim, index, before, after)]) of a patch file."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise EditError(f"no such patch file: {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            raw = (f.metadata() or {}).get(_META_KEY)
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as exc:  # safetensors raises its own error types for bad files
        raise EditError(f"{path} is not a kn-edit patch file ({type(exc).__name__}: {exc})") from exc
    if raw is None:
        raise EditError(f"{path} is a safetensors file but not a kn-edit patch (no {_META_KEY} metadata)")
    meta = json.loads(raw)
    if meta.get("format") != FORMAT or meta.get("version") != VERSION:
        raise EditError(f"{path}: unsupported patch format {meta.get('format')!r} version {meta.get('version')!r}")
    entries = []
    for i, p in enumerate(meta["params"]):
        try:
            entries.append((p["name"], int(p["dim"]), tensors[f"{i}.index"], tensors[f"{i}.before"], tensors[f"{i}.after"]))
        except KeyError as exc:
            raise EditError(f"{path} is damaged: tensor {exc} missing") from exc
    return meta, entries


def check_model(km, meta: dict, path: str | Path) -> None:
    """Refuse a patch made for a different model, naming what differs."""
    ours = km.fingerprint()
    theirs = meta.get("fingerprint", {})
    diffs = [f"{k}: patch {theirs.get(k)!r}, model {ours.get(k)!r}" for k in sorted(set(ours) | set(theirs))
             if theirs.get(k) != ours.get(k)]
    if diffs:
        raise EditError(
            f"{path} was made for a different model ({meta.get('model')!r}) than {km.name!r}: " + "; ".join(diffs)
        )


def apply_patch(km, path: str | Path, reverse: bool = False, check_values: bool = True) -> Edit:
    """Apply the patch file to ``km`` (``reverse``: take it off a model that has it) and return the Edit.

    The touched rows must hold the patch's values before (after, when reversing) bit for bit, so a patch is
    never laid over a different state of the model; ``check_values=False`` skips that check."""
    path = Path(path)
    meta, entries = read_patch(path)
    check_model(km, meta, path)
    changes = []
    for name, dim, index, before, after in entries:
        try:
            param = km.model.get_parameter(name)
        except AttributeError as exc:
            raise EditError(f"{path} patches {name!r}, which this model does not have") from exc
        expected, written = (after, before) if reverse else (before, after)
        shape = list(param.shape)
        shape[dim] = index.numel()
        if list(written.shape) != shape:
            raise EditError(f"{path}: {name} rows have shape {tuple(written.shape)}, the model needs {tuple(shape)}")
        if check_values:
            current = param.detach().index_select(dim, index.to(param.device)).cpu()
            if not torch.equal(current, expected.to(current.dtype)):
                state = "patched" if reverse else "original"
                raise EditError(
                    f"{path}: {name} does not hold the patch's {state} values (the model is already "
                    f"{'unpatched' if reverse else 'patched'} or was edited otherwise); nothing was changed"
                )
        changes.append(SliceChange(name, dim, index, written, additive=False))
    verb = "remove" if reverse else "apply"
    edit = commit(km, f"patch-{verb}:{meta.get('editor')}", [], changes)
    edit.report = EditReport(method=f"patch-{verb}", parameters=parameter_changes(km, edit.patches), details=PatchDetails(
        str(path), verb, meta.get("model"), meta.get("editor"), meta.get("report")))
    return edit


def remove_patch(km, path: str | Path, check_values: bool = True) -> Edit:
    """Take a patch off a model that carries it (e.g. a saved patched model); revert() puts it back."""
    return apply_patch(km, path, reverse=True, check_values=check_values)
