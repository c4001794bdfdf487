"""The patch file format: an edit as a safetensors file with JSON metadata, written atomically (see
kn_edit.storage.atomic) and read back with every check. Putting a patch on a model and taking it off:
:mod:`kn_edit.editing.patchfile`.

Format version 2 (``"format": "kn-edit-patch", "version": 2``). Per touched parameter ``i`` the file holds

* ``i.before`` and ``i.after``: the touched rows' values before and after the edit, shaped like the parameter
  with ``rows`` rows along ``dim``;
* ``i.index`` [rows] int64: which rows, except for a *whole-parameter* patch (``"whole": true``: every row
  along ``dim`` in order, as editors that change a whole matrix produce), which stores no index.

The metadata (one JSON string) records the model's name and fingerprint, the editor, its requests, and per
parameter its name, dim, shape, rows, whole, and for every tensor its dtype, shape and sha256 digest. Reading
checks the metadata against one schema (:class:`PatchMeta`) field by field, and every tensor against its
recorded dtype, shape and digest, that before/after are finite floating-point values, the index lies in
range and no two entries change the same values of a parameter, before anything is written to a model; any
mismatch is an EditError naming the tensor. Applying also refuses a patch whose values are not of the
parameter's dtype (no conversion, even a lossless one).

Version-1 files (index/before/after for every parameter, no digests) are still read, with every check except
the digests.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ..errors import EditError
from ..storage.atomic import atomic_file
from ..storage.digest import tensor_digest

if TYPE_CHECKING:
    from .ledger import Edit  # the ledger imports this module (Edit.save); typed here only


@dataclass
class PatchDetails:
    """The report details of applying (or removing) a patch file."""

    path: str
    action: str  # apply | remove
    model: str | None  # the model the patch was made on
    editor: str | None  # the method that made it
    report: dict | None  # that edit's report, as saved (the metadata's "info")

FORMAT = "kn-edit-patch"
VERSION = 2
READABLE_VERSIONS = (1, 2)
_META_KEY = "kn_edit_patch"
_FLOAT_DTYPES = {str(d): d for d in (torch.float16, torch.bfloat16, torch.float32, torch.float64)}



# ----- the metadata schema --------------------------------------------------------------------------------
class _Bad(Exception):
    """A schema violation; the reader turns it into an EditError naming the file."""


def _want(value: Any, kind: type | tuple[type, ...], where: str, what: str) -> Any:
    # bool is an int in Python; no field here accepts a bool in place of a number or vice versa
    ok = isinstance(value, kind) and not (isinstance(value, bool) and bool not in (kind if isinstance(kind, tuple) else (kind,)))
    if not ok:
        raise _Bad(f"{where} must be {what}, got {value!r}"[:300])
    return value


def _int_list(value: Any, where: str) -> list[int]:
    _want(value, list, where, "a list of non-negative integers")
    for v in value:
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise _Bad(f"{where} must be a list of non-negative integers, got {value!r}"[:300])
    return value


@dataclass
class TensorMeta:
    dtype: str
    shape: list[int]
    sha256: str

    @classmethod
    def parse(cls, raw: Any, where: str) -> "TensorMeta":
        _want(raw, dict, where, "an object")
        digest = _want(raw.get("sha256"), str, f"{where}.sha256", "a sha256 hex digest")
        if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
            raise _Bad(f"{where}.sha256 must be a sha256 hex digest, got {digest!r}")
        return cls(_want(raw.get("dtype"), str, f"{where}.dtype", "a dtype name"),
                   _int_list(raw.get("shape"), f"{where}.shape"), digest)

    @classmethod
    def of(cls, t: torch.Tensor) -> "TensorMeta":
        return cls(str(t.dtype), list(t.shape), tensor_digest(t))


@dataclass
class ParamMeta:
    name: str
    dim: int
    rows: int
    whole: bool = False
    shape: list[int] | None = None  # the whole parameter's shape (version 2)
    tensors: dict[str, TensorMeta] = field(default_factory=dict)  # "index" (unless whole), "before", "after"

    @classmethod
    def parse(cls, raw: Any, where: str, version: int) -> "ParamMeta":
        _want(raw, dict, where, "an object")
        name = _want(raw.get("name"), str, f"{where}.name", "a parameter name")
        dim = _want(raw.get("dim"), int, f"{where}.dim", "a non-negative integer")
        rows = _want(raw.get("rows"), int, f"{where}.rows", "a non-negative integer")
        if dim < 0 or rows < 0:
            raise _Bad(f"{where}: dim and rows must be non-negative, got dim={dim}, rows={rows}")
        if version == 1:
            return cls(name, dim, rows)
        whole = _want(raw.get("whole"), bool, f"{where}.whole", "true or false")
        shape = _int_list(raw.get("shape"), f"{where}.shape")
        if dim >= len(shape):
            raise _Bad(f"{where}: dim {dim} out of range for a parameter of shape {tuple(shape)}")
        if rows > shape[dim] or (whole and rows != shape[dim]):
            raise _Bad(f"{where}: {rows} rows do not fit size {shape[dim]} along dim {dim}")
        raw_tensors = _want(raw.get("tensors"), dict, f"{where}.tensors", "an object")
        needed = ("before", "after") if whole else ("index", "before", "after")
        missing = [k for k in needed if k not in raw_tensors]
        if missing:
            raise _Bad(f"{where}.tensors lacks {missing}")
        tensors = {k: TensorMeta.parse(raw_tensors[k], f"{where}.tensors.{k}") for k in needed}
        return cls(name, dim, rows, whole, shape, tensors)


@dataclass
class RequestMeta:
    prompts: list[str]
    old: str
    new: str | None = None
    subject: str | None = None
    relation: str | None = None

    @classmethod
    def parse(cls, raw: Any, where: str) -> "RequestMeta":
        _want(raw, dict, where, "an object")
        prompts = _want(raw.get("prompts"), list, f"{where}.prompts", "a list of strings")
        if not all(isinstance(p, str) for p in prompts):
            raise _Bad(f"{where}.prompts must be a list of strings")
        opt = {k: _want(raw.get(k), (str, type(None)), f"{where}.{k}", "a string or null")
               for k in ("new", "subject", "relation")}
        return cls(prompts, _want(raw.get("old"), str, f"{where}.old", "a string"), **opt)


@dataclass
class PatchMeta:
    """The metadata of a patch file, checked field by field (:meth:`parse`)."""

    format: str
    version: int
    model: str
    fingerprint: dict[str, Any]
    editor: str
    requests: list[RequestMeta]
    params: list[ParamMeta]
    info: dict[str, Any]

    @classmethod
    def parse(cls, raw: Any) -> "PatchMeta":
        _want(raw, dict, "the metadata", "a JSON object")
        if raw.get("format") != FORMAT:
            raise _Bad(f"format is {raw.get('format')!r}, not {FORMAT!r}")
        version = raw.get("version")
        if isinstance(version, bool) or version not in READABLE_VERSIONS:
            raise _Bad(f"unsupported format version {version!r} (this kn-edit reads versions "
                       f"{', '.join(map(str, READABLE_VERSIONS))}; a newer kn-edit may read it)")
        params = _want(raw.get("params"), list, "params", "a list of parameter entries")
        if not params:
            raise _Bad("params is empty: the patch changes nothing")
        requests = _want(raw.get("requests", []), list, "requests", "a list")
        fingerprint = _want(raw.get("fingerprint"), dict, "fingerprint", "an object")
        return cls(
            FORMAT, version, _want(raw.get("model"), str, "model", "a string"), fingerprint,
            _want(raw.get("editor"), str, "editor", "a string"),
            [RequestMeta.parse(r, f"requests[{i}]") for i, r in enumerate(requests)],
            [ParamMeta.parse(p, f"params[{i}]", version) for i, p in enumerate(params)],
            _want(raw.get("info", {}), dict, "info", "an object"),
        )

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class PatchEntry:
    """One parameter's part of a patch: rows ``index`` [rows] along ``dim``, their values before and after."""

    name: str
    dim: int
    index: torch.Tensor
    before: torch.Tensor
    after: torch.Tensor
    whole: bool = False

    def __iter__(self):  # (name, dim, index, before, after), as read_patch has always returned
        return iter((self.name, self.dim, self.index, self.before, self.after))


# ----- writing --------------------------------------------------------------------------------------------
def _edit_metadata(edit: Edit) -> dict:
    """The free-form part of the metadata: the edit's report (EditReport.to_dict), JSON-friendly."""
    return edit.report.to_dict() if edit.report is not None else {}


def _is_whole(index: torch.Tensor, size: int) -> bool:
    return index.numel() == size and bool(torch.equal(index.cpu().to(torch.long), torch.arange(size)))


def save_patch(edit: Edit, path: str | Path) -> Path:
    """Write ``edit`` to ``path`` (refuses an existing path; nothing is left behind on failure)."""
    from safetensors.torch import save_file

    if not edit.patches:
        raise EditError("the edit has no patches to save")
    km = edit.model
    tensors: dict[str, torch.Tensor] = {}
    params = []
    for i, p in enumerate(edit.patches):
        shape = list(km.model.get_parameter(p.name).shape)
        index = p.index.to(torch.long).cpu().contiguous()
        whole = _is_whole(index, shape[p.dim])
        own = {"before": p.before.detach().cpu().contiguous(), "after": p.after.detach().cpu().contiguous()}
        if not whole:
            own["index"] = index
        for k, t in own.items():
            tensors[f"{i}.{k}"] = t
        params.append({"name": p.name, "dim": p.dim, "rows": int(index.numel()), "whole": whole, "shape": shape,
                       "tensors": {k: asdict(TensorMeta.of(t)) for k, t in own.items()}})
    meta = {
        "format": FORMAT,
        "version": VERSION,
        "model": km.name,
        "fingerprint": km.fingerprint(),
        "editor": edit.editor,
        "requests": [{"prompts": list(r.prompts), "old": r.old, "new": r.new, "subject": r.subject,
                      "relation": r.relation} for r in edit.requests],
        "params": params,
        "info": _edit_metadata(edit),
    }
    path = Path(path)
    with atomic_file(path, what="patch") as tmp:
        save_file(tensors, str(tmp), metadata={_META_KEY: json.dumps(meta, default=str)})
    return path


# ----- reading --------------------------------------------------------------------------------------------
def _check_tensor(path: Path, key: str, t: torch.Tensor, meta: TensorMeta | None) -> None:
    if meta is None:
        return
    if str(t.dtype) != meta.dtype:
        raise EditError(f"{path}: tensor {key!r} is {t.dtype}, the metadata says {meta.dtype}; the file is damaged")
    if list(t.shape) != meta.shape:
        raise EditError(f"{path}: tensor {key!r} has shape {tuple(t.shape)}, the metadata says {tuple(meta.shape)}; "
                        "the file is damaged")
    if tensor_digest(t) != meta.sha256:
        raise EditError(f"{path}: tensor {key!r} does not match its sha256 digest; the file is damaged")


def _entry(path: Path, i: int, p: ParamMeta, tensors: dict[str, torch.Tensor]) -> PatchEntry:
    def get(k: str) -> torch.Tensor:
        if f"{i}.{k}" not in tensors:
            raise EditError(f"{path} is damaged: tensor '{i}.{k}' ({p.name}) is missing")
        t = tensors[f"{i}.{k}"]
        _check_tensor(path, f"{i}.{k}", t, p.tensors.get(k))
        return t

    before, after = get("before"), get("after")
    for k, t in (("before", before), ("after", after)):
        if str(t.dtype) not in _FLOAT_DTYPES:
            raise EditError(f"{path}: tensor '{i}.{k}' ({p.name}) is {t.dtype}, not floating point")
        if not bool(torch.isfinite(t).all()):
            raise EditError(f"{path}: tensor '{i}.{k}' ({p.name}) holds NaN or infinite values")
    if p.whole:
        index = torch.arange(p.rows)
    else:
        index = get("index")
        if index.dtype != torch.long or index.dim() != 1:
            raise EditError(f"{path}: tensor '{i}.index' ({p.name}) must be a 1-D int64 tensor, got "
                            f"{index.dtype} {tuple(index.shape)}")
        if index.numel() and int(index.min()) < 0:
            raise EditError(f"{path}: tensor '{i}.index' ({p.name}) holds negative rows")
        if p.shape is not None and index.numel() and int(index.max()) >= p.shape[p.dim]:
            raise EditError(f"{path}: tensor '{i}.index' ({p.name}) holds rows beyond size {p.shape[p.dim]}")
        if torch.unique(index).numel() != index.numel():
            raise EditError(f"{path}: tensor '{i}.index' ({p.name}) repeats rows")
    if index.numel() != p.rows:
        raise EditError(f"{path}: {p.name} has {index.numel()} rows, the metadata says {p.rows}")
    if before.dim() != after.dim() or p.dim >= before.dim():
        raise EditError(f"{path}: {p.name}: dim {p.dim} out of range for its tensors of shape {tuple(before.shape)}")
    for k, t in (("before", before), ("after", after)):
        expected = list(p.shape) if p.shape is not None else list(t.shape)
        expected[p.dim] = p.rows
        if list(t.shape) != expected:
            raise EditError(f"{path}: tensor '{i}.{k}' ({p.name}) has shape {tuple(t.shape)}, expected {tuple(expected)}")
    return PatchEntry(p.name, p.dim, index, before, after, p.whole)


def _check_overlaps(path: Path, entries: list[PatchEntry]) -> None:
    """Refuse two entries that change the same values of one parameter: which one should win is no question a
    patch may leave open (the ledger would silently let the second win)."""
    for j, b in enumerate(entries):
        for i, a in enumerate(entries[:j]):
            if a.name != b.name or not a.index.numel() or not b.index.numel():
                continue
            if a.dim != b.dim:  # a row along one dim and one along another always share a value
                raise EditError(f"{path}: entries {i} and {j} both change {a.name} (along dims {a.dim} and {b.dim}); "
                                "a patch may change each value only once")
            shared = a.index[torch.isin(a.index, b.index)]
            if shared.numel():
                raise EditError(f"{path}: entries {i} and {j} both change rows {shared[:5].tolist()} of {a.name} "
                                f"(dim {a.dim}); a patch may change each value only once")


def read_patch_file(path: str | Path) -> tuple[PatchMeta, list[PatchEntry]]:
    """The checked metadata and entries of a patch file; EditError (naming the tensor or field) otherwise."""
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
    try:
        meta = PatchMeta.parse(json.loads(raw))
    except json.JSONDecodeError as exc:
        raise EditError(f"{path}: the patch metadata is not valid JSON ({exc.msg} at character {exc.pos})") from exc
    except _Bad as exc:
        raise EditError(f"{path}: bad patch metadata: {exc}") from exc
    entries = [_entry(path, i, p, tensors) for i, p in enumerate(meta.params)]
    _check_overlaps(path, entries)
    return meta, entries


def read_patch(path: str | Path) -> tuple[dict, list[PatchEntry]]:
    """(metadata as a dict, entries) of a patch file, checked as :func:`read_patch_file` does; each entry also
    unpacks as (param name, dim, index, before, after)."""
    meta, entries = read_patch_file(path)
    return meta.to_dict(), entries
