"""Patch files on models: a saved edit (:mod:`kn_edit.editing.patch_format`) put on a freshly loaded model, and
taken off one that carries it, through the model's edit ledger, after every check of the file and of the model."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch

from ..errors import EditError
from .ledger import Edit, SliceChange, commit
from .patch_format import (
    FORMAT,
    VERSION,
    PatchDetails,
    PatchEntry,
    PatchMeta,
    read_patch,
    read_patch_file,
    save_patch,
    tensor_digest,
)
from .report import EditReport, parameter_changes

if TYPE_CHECKING:
    from ..models.model import KnModel


# ----- applying -------------------------------------------------------------------------------------------
def check_model(km: KnModel, meta: dict | PatchMeta, path: str | Path) -> None:
    """Refuse a patch made for a different model, naming what differs."""
    if isinstance(meta, PatchMeta):
        meta = meta.to_dict()
    ours = km.fingerprint()
    theirs = meta.get("fingerprint")
    if not isinstance(theirs, dict):
        raise EditError(f"{path}: bad patch metadata: fingerprint must be an object, got {theirs!r}")
    diffs = [f"{k}: patch {theirs.get(k)!r}, model {ours.get(k)!r}" for k in sorted(set(ours) | set(theirs))
             if theirs.get(k) != ours.get(k)]
    if diffs:
        made_for = meta.get("model")
        who = (f"a model also named {made_for!r} but with a different layout" if made_for == km.name
               else f"a different model ({made_for!r}) than {km.name!r}")
        raise EditError(f"{path} was made for {who}: " + "; ".join(diffs))


def apply_patch(km: KnModel, path: str | Path, reverse: bool = False, check_values: bool = True) -> Edit:
    """Apply the patch file to ``km`` (``reverse``: take it off a model that has it) and return the Edit.

    The file is checked completely (see the module docstring) before anything is written. The touched rows must
    hold the patch's values before (after, when reversing) bit for bit, so a patch is never laid over a different
    state of the model; ``check_values=False`` skips that check."""
    path = Path(path)
    meta, entries = read_patch_file(path)
    check_model(km, meta, path)
    changes = []
    for e in entries:
        try:
            param = km.model.get_parameter(e.name)
        except AttributeError as exc:
            raise EditError(f"{path} patches {e.name!r}, which this model does not have") from exc
        if e.dim >= param.dim():
            raise EditError(f"{path}: {e.name} has {param.dim()} dims; the patch edits it along dim {e.dim}")
        if e.index.numel() and int(e.index.max()) >= param.shape[e.dim]:
            raise EditError(f"{path}: {e.name} rows {int(e.index.max())} out of range (size {param.shape[e.dim]})")
        mistyped = next((t.dtype for t in (e.before, e.after) if t.dtype != param.dtype), None)
        if mistyped is not None:  # casting would change the values the patch records, or make up digits
            raise EditError(f"{path}: the patch holds {mistyped} values for {e.name}, which is {param.dtype} in this "
                            "model; a patch applies only to parameters of its own dtype (nothing was changed)")
        expected, written = (e.after, e.before) if reverse else (e.before, e.after)
        shape = list(param.shape)
        shape[e.dim] = e.index.numel()
        if list(written.shape) != shape:
            raise EditError(f"{path}: {e.name} rows have shape {tuple(written.shape)}, the model needs {tuple(shape)}")
        if check_values:
            current = param.detach().index_select(e.dim, e.index.to(param.device)).cpu()
            if not torch.equal(current, expected.to(current.dtype)):
                state = "patched" if reverse else "original"
                raise EditError(
                    f"{path}: {e.name} does not hold the patch's {state} values: the model is already "
                    f"{'unpatched' if reverse else 'patched'}, was edited otherwise, or its weights differ from "
                    f"those of the {meta.model!r} the patch was made on; nothing was changed"
                )
        changes.append(SliceChange(e.name, e.dim, e.index, written, additive=False))
    verb = "remove" if reverse else "apply"
    edit = commit(km, f"patch-{verb}:{meta.editor}", [], changes)
    edit.report = EditReport(method=f"patch-{verb}", parameters=parameter_changes(km, edit.patches),
                             details=PatchDetails(str(path), verb, meta.model, meta.editor, meta.info))
    return edit


def remove_patch(km: KnModel, path: str | Path, check_values: bool = True) -> Edit:
    """Take a patch off a model that carries it (e.g. a saved patched model); revert() puts it back."""
    return apply_patch(km, path, reverse=True, check_values=check_values)


__all__ = ["FORMAT", "VERSION", "PatchDetails", "PatchEntry", "PatchMeta", "apply_patch", "check_model", "read_patch",
           "read_patch_file", "remove_patch", "save_patch", "tensor_digest"]
