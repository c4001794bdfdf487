"""The edit ledger and the revertible edits it makes: one ledger per model, so that edits can be stacked and reverted in any order, bit for bit.

At the first touch of a slice (one row or column of a parameter, e.g. a value vector; or every slice of it, for
editors that change a whole matrix) the ledger keeps a copy of its pristine value. Every edit is stored as one
operation per (parameter, dim): a block of slices, each either *added* (update rules, which then compose with
other edits of the same neuron) or *set* (erasure, patch files). The value of a touched slice is always
recomputed the same way: pristine, then every active edit's operation in the order the edits were applied,
with tensor indexing (no loop over slices). So

* applying edit B after A and reverting B gives exactly the state after A alone;
* reverting A while B stays gives pristine + B (B as if A had never been applied);
* once no active edit touches a slice, its pristine copy is written back as is and forgotten.

The ledger assumes touched slices change only through it: a write by other code to a touched slice is
overwritten by the next recomputation.

:meth:`Ledger.state` names the weights' current values for caches of what depends on the weights alone
(kn_edit.editing.memo): equal states mean equal weights, bit for bit. A trial edit applied and reverted leaves the
state as it was, though torch counts both writes in the tensors' versions; any other in-place write changes it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Hashable, Sequence, TYPE_CHECKING

import torch

from ..data.records import EditRequest
from ..errors import EditError
from ..models.model import LEDGER_ATTR as _ATTR
from .patch_format import save_patch

if TYPE_CHECKING:
    from ..models.model import KnModel
    from .report import EditReport  # the report imports nothing of the ledger; typed here only

@dataclass(eq=False)
class ParamPatch:
    """Values of parameter ``name`` at ``index`` along ``dim``, before and after the edit (CPU copies).

    ``delta`` is set for additive patches (the edit adds it to the slices, so it composes with other edits
    of the same slices); ``None`` means the edit sets the slices to ``after``.
    """

    name: str
    dim: int
    index: torch.Tensor  # [k] long
    before: torch.Tensor
    after: torch.Tensor
    delta: torch.Tensor | None = None


@dataclass(eq=False)
class Edit:
    """Handle on an applied edit, made by the model's ledger (:func:`kn_edit.editing.ledger.commit`).
    ``revert()`` takes it back; once every edit of a slice is reverted, the slice holds its original values
    bit for bit, whatever the order. ``report`` says what the editor did (:class:`EditReport`)."""

    editor: str
    requests: tuple[EditRequest, ...]
    patches: list[ParamPatch]
    model: KnModel  # the model the edit was applied to
    ledger: Any = field(repr=False)  # the model's Ledger: the one way back
    report: EditReport | None = None
    active: bool = True
    serial: int = field(default=0, repr=False)  # its number among the ledger's edits (never reused)

    def revert(self) -> None:
        if not self.active:
            raise EditError("this edit was already reverted")
        self.ledger.revert(self)

    def save(self, path) -> None:
        """Write this edit as a patch file (safetensors + JSON metadata), atomically; see ``apply_patch``."""
        save_patch(self, path)

    @property
    def touched_parameters(self) -> list[str]:
        return sorted({p.name for p in self.patches})


# (parameter name, dim) → {row: value}; a "row" is param.select(dim, row).
Key = tuple[str, int]


@dataclass(frozen=True)
class SliceChange:
    """A change an editor asks for: rows ``index`` [k] of parameter ``name`` along ``dim``.

    value: shaped like ``param.index_select(dim, index)``; added to the rows (``additive``) or written.
    """

    name: str
    dim: int
    index: torch.Tensor
    value: torch.Tensor
    additive: bool = True


def ledger_for(km: KnModel) -> "Ledger":
    """The ledger of ``km``'s model, created at first use. It lives on the Hugging Face module, so two
    KnModels wrapping the same module share it."""
    model = km.model
    ledger = model.__dict__.get(_ATTR)
    if ledger is None:
        ledger = Ledger(model)
        model.__dict__[_ATTR] = ledger
    return ledger


def commit(km: KnModel, editor: str, requests: Sequence[EditRequest], changes: Sequence[SliceChange]) -> Edit:
    """Apply ``changes`` to ``km`` as one revertible Edit (nothing changes if this raises)."""
    return ledger_for(km).commit(km, editor, requests, changes)


@dataclass
class _Op:
    """One edit's change of one (parameter, dim): slices ``index`` [k] (sorted, unique), each set to or
    increased by its slice of ``value`` (``param.index_select(dim, index)``-shaped, CPU)."""

    index: torch.Tensor
    setting: torch.Tensor  # [k] bool: True = write the value, False = add it
    value: torch.Tensor


def _merge(op: _Op | None, index: torch.Tensor, value: torch.Tensor, additive: bool, dim: int) -> _Op:
    """``op`` followed by one more change: add+add sums, set replaces, set+add adds to the set value."""
    if op is None:
        order = torch.argsort(index)
        setting = torch.full((index.numel(),), not additive, dtype=torch.bool)
        return _Op(index[order], setting, value.index_select(dim, order).clone())
    union = torch.unique(torch.cat([op.index, index]))  # sorted
    where = torch.searchsorted(union, op.index)
    shape = list(op.value.shape)
    shape[dim] = union.numel()
    merged = torch.zeros(shape, dtype=op.value.dtype)
    merged.index_copy_(dim, where, op.value)
    setting = torch.zeros(union.numel(), dtype=torch.bool)
    setting[where] = op.setting
    at = torch.searchsorted(union, index)
    if additive:
        merged.index_add_(dim, at, value)
    else:
        merged.index_copy_(dim, at, value)
        setting[at] = True
    return _Op(union, setting, merged)


def _apply(block: torch.Tensor, rows: torch.Tensor, op: _Op, dim: int) -> torch.Tensor:
    """``block`` (the values of sorted ``rows`` along ``dim``) with ``op`` applied to the rows it shares."""
    pos = torch.searchsorted(rows, op.index).clamp(max=max(rows.numel() - 1, 0))
    hit = rows[pos] == op.index if rows.numel() else torch.zeros(op.index.numel(), dtype=torch.bool)
    if not bool(hit.any()):
        return block
    sets, adds = hit & op.setting, hit & ~op.setting
    if bool(sets.any()):
        block = block.index_copy(dim, pos[sets], op.value.index_select(dim, sets.nonzero().flatten()))
    if bool(adds.any()):
        block = block.index_add(dim, pos[adds], op.value.index_select(dim, adds.nonzero().flatten()))
    return block


class Ledger:
    def __init__(self, model: torch.nn.Module) -> None:
        self._model = model
        # (parameter, dim) → (sorted touched rows [k], their pristine values, index_select(dim, rows)-shaped)
        self._pristine: dict[Key, tuple[torch.Tensor, torch.Tensor]] = {}
        # (edit, {key: op}) in the order the edits were applied.
        self._entries: list[tuple[Edit, dict[Key, _Op]]] = []
        # For state(): each active edit's serial number (never reused, unlike id()), and per parameter the
        # (storage, version) right after the ledger's last write with the (storage, version) its values derive from.
        self._serial = 0
        self._serials: dict[Edit, int] = {}
        self._written: dict[str, tuple[tuple[int, int], tuple[int, int]]] = {}

    @property
    def active_edits(self) -> list[Edit]:
        return [edit for edit, _ in self._entries]

    @property
    def touched_rows(self) -> dict[Key, list[int]]:
        """Rows that differ (or may differ) from pristine now, per (parameter, dim)."""
        return {key: rows.tolist() for key, (rows, _) in self._pristine.items()}

    def _param(self, name: str) -> torch.nn.Parameter:
        try:
            return self._model.get_parameter(name)
        except AttributeError as exc:
            raise EditError(f"the model has no parameter {name!r}") from exc

    # ----- building an edit ------------------------------------------------------------------------------
    def _operations(self, changes: Sequence[SliceChange]) -> dict[Key, _Op]:
        """Changes checked and merged per (parameter, dim), in order."""
        ops: dict[Key, _Op] = {}
        for change in changes:
            param = self._param(change.name)
            if isinstance(change.dim, bool) or change.dim not in range(param.dim()):
                raise EditError(f"{change.name} has {param.dim()} dims; cannot edit along dim {change.dim}")
            for name, dim in list(self._pristine) + list(ops):
                if name == change.name and dim != change.dim:
                    raise EditError(f"{change.name} is already edited along dim {dim}, not {change.dim}")
            index = torch.as_tensor(change.index).flatten().cpu()
            if index.is_floating_point() or index.dtype == torch.bool:
                raise EditError(f"rows of a change of {change.name} must be integers, got {index.dtype}")
            index = index.to(torch.long)
            n_rows = param.shape[change.dim]
            if index.numel() and (int(index.min()) < 0 or int(index.max()) >= n_rows):
                raise EditError(f"rows out of range for {change.name} (size {n_rows} along dim {change.dim})")
            if torch.unique(index).numel() != index.numel():
                raise EditError(f"repeated rows in one change of {change.name}")
            expected = list(param.shape)
            expected[change.dim] = index.numel()
            if list(change.value.shape) != expected:
                raise EditError(f"change of {change.name} has shape {tuple(change.value.shape)}, expected {tuple(expected)}")
            if not index.numel():
                continue
            value = change.value.detach().to("cpu", param.dtype)
            key = (change.name, change.dim)
            ops[key] = _merge(ops.get(key), index, value, change.additive, change.dim)
        return ops

    def _value(self, key: Key, rows: torch.Tensor) -> torch.Tensor:
        """Pristine values of ``rows`` (sorted, all touched), then every active edit's operation, in order."""
        known, pristine = self._pristine[key]
        block = pristine.index_select(key[1], torch.searchsorted(known, rows))
        for _, ops in self._entries:
            op = ops.get(key)
            if op is not None:
                block = _apply(block, rows, op, key[1])
        return block

    def _write(self, key: Key, rows: torch.Tensor, block: torch.Tensor) -> None:
        param = self._param(key[0])
        base = self._base(key[0], param)
        param.index_copy_(key[1], rows.to(param.device), block.to(param.device, param.dtype))
        self._written[key[0]] = ((param.data_ptr(), param._version), base)

    def _base(self, name: str, param: torch.Tensor) -> tuple[int, int]:
        """The (storage, version) that ``param``'s values derive from: its current one, unless only the ledger
        wrote it since that one (its values are then that one's, with the active edits applied)."""
        now = (param.data_ptr(), param._version)
        written = self._written.get(name)
        return written[1] if written is not None and written[0] == now else now

    def state(self) -> tuple:
        """A hashable name of the weights' current values: the active edits (in order) and each parameter's
        :meth:`_base`. Writes through ``.data`` escape torch's version counter, and so this state."""
        edits = tuple(self._serials[edit] for edit, _ in self._entries)
        return edits, tuple(self._base(name, p) for name, p in self._model.named_parameters())

    def _read(self, key: Key, rows: torch.Tensor) -> torch.Tensor:
        param = self._param(key[0])
        return param.detach().index_select(key[1], rows.to(param.device)).cpu().clone()

    def _remember(self, key: Key, rows: torch.Tensor, values: torch.Tensor) -> None:
        """Add pristine copies of the rows not yet known (``values``: the current values of ``rows``)."""
        dim = key[1]
        if key not in self._pristine:
            self._pristine[key] = (rows.clone(), values.clone())
            return
        known, pristine = self._pristine[key]
        new = ~torch.isin(rows, known)
        if not bool(new.any()):
            return
        union = torch.cat([known, rows[new]])
        order = torch.argsort(union)
        block = torch.cat([pristine, values.index_select(dim, new.nonzero().flatten())], dim=dim)
        self._pristine[key] = (union[order], block.index_select(dim, order))

    def _forget(self, key: Key, rows: torch.Tensor) -> None:
        known, pristine = self._pristine[key]
        keep = ~torch.isin(known, rows)
        if not bool(keep.any()):
            del self._pristine[key]
        else:
            self._pristine[key] = (known[keep], pristine.index_select(key[1], keep.nonzero().flatten()))

    def commit(self, km: KnModel, editor: str, requests: Sequence[EditRequest], changes: Sequence[SliceChange]) -> Edit:
        if km.model is not self._model:
            raise EditError("this ledger belongs to another model")
        ops = self._operations(changes)
        if not ops:
            raise EditError("the edit changes nothing")
        edit = Edit(editor=editor, requests=tuple(requests), patches=[], model=km, ledger=self)
        saved = dict(self._pristine)  # values are replaced, never mutated: a shallow copy restores them
        with torch.no_grad():
            befores = {key: self._read(key, op.index) for key, op in ops.items()}
            try:
                for key, op in ops.items():
                    self._remember(key, op.index, befores[key])
                self._entries.append((edit, ops))
                self._serial += 1
                self._serials[edit] = edit.serial = self._serial
                for key, op in ops.items():
                    self._write(key, op.index, self._value(key, op.index))
            except BaseException:
                # Put back exactly what was there, and forget this edit.
                self._entries = [(e, o) for e, o in self._entries if e is not edit]
                self._serials.pop(edit, None)
                for key, before in befores.items():
                    self._write(key, ops[key].index, before)
                self._pristine = saved
                raise
            for key, op in ops.items():
                name, dim = key
                additive = not bool(op.setting.any())
                edit.patches.append(ParamPatch(name, dim, op.index, befores[key], self._read(key, op.index),
                                               op.value if additive else None))
        return edit

    # ----- reverting ---------------------------------------------------------------------------------------
    def revert(self, edit: Edit) -> None:
        found = [ops for e, ops in self._entries if e is edit]
        if not found:
            raise EditError("this edit is not active on this model (already reverted?)")
        ops = found[0]
        with torch.no_grad():
            self._entries = [(e, o) for e, o in self._entries if e is not edit]
            del self._serials[edit]
            for key, op in ops.items():
                self._write(key, op.index, self._value(key, op.index))
                still = [o[key].index for _, o in self._entries if key in o]
                idle = op.index[~torch.isin(op.index, torch.cat(still))] if still else op.index
                if idle.numel():
                    self._forget(key, idle)
        edit.active = False

    def revert_all(self) -> None:
        """Revert every active edit, newest first."""
        for edit in reversed(self.active_edits):
            edit.revert()


def active_edits(km: KnModel) -> list[Edit]:
    """The edits applied to ``km`` and not reverted, oldest first."""
    return km.active_edits


def weights_state(km: KnModel) -> Hashable:
    """A hashable name of ``km``'s current weights, told cheaply (no pass over their bytes): equal names hold the
    same weights bit for bit (:meth:`Ledger.state`). A cache of something computed from the weights keeps the state
    it was computed in (context prefixes, key statistics, the guard's NLL: kn_edit.editing.memo)."""
    return ledger_for(km).state()
