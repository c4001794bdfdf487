"""The edit ledger: one per model, so that edits can be stacked and reverted in any order, bit for bit.

At the first touch of a slice (one row or column of a parameter, e.g. a value vector) the ledger keeps a copy
of its pristine value. Every edit is stored as per-slice operations: *add* a delta (update rules, which then
compose with other edits of the same neuron) or *set* a value (erasure, patch files). The value of a touched
slice is always recomputed the same way: pristine, then every active edit's operation in the order the edits
were applied. So

* applying edit B after A and reverting B gives exactly the state after A alone;
* reverting A while B stays gives pristine + B (B as if A had never been applied);
* once no active edit touches a slice, its pristine copy is written back as is and forgotten.

The ledger assumes touched slices change only through it: a write by other code to a touched slice is
overwritten by the next recomputation.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch

from ..errors import EditError
from .base import Edit, EditRequest, ParamPatch

_ATTR = "_kn_edit_ledger"

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


def ledger_for(km) -> "Ledger":
    """The ledger of ``km``'s model, created at first use. It lives on the Hugging Face module, so two
    KnModels wrapping the same module share it."""
    model = km.model
    ledger = model.__dict__.get(_ATTR)
    if ledger is None:
        ledger = Ledger(model)
        model.__dict__[_ATTR] = ledger
    return ledger


def commit(km, editor: str, requests: Sequence[EditRequest], changes: Sequence[SliceChange], info: dict | None = None) -> Edit:
    """Apply ``changes`` to ``km`` as one revertible Edit (nothing changes if this raises)."""
    return ledger_for(km).commit(km, editor, requests, changes, info or {})


def _write_rows(param: torch.nn.Parameter, dim: int, rows: list[int], values: list[torch.Tensor]) -> None:
    """Write ``values`` (each param.select(dim, row)-shaped) into ``rows`` of ``param``."""
    index = torch.tensor(rows, dtype=torch.long, device=param.device)
    param.index_copy_(dim, index, torch.stack(values, dim=dim).to(param.device, param.dtype))


class Ledger:
    def __init__(self, model: torch.nn.Module) -> None:
        self._model = model
        self._pristine: dict[Key, dict[int, torch.Tensor]] = {}
        # (edit, {key: {row: (additive, value)}}) in the order the edits were applied.
        self._entries: list[tuple[Edit, dict[Key, dict[int, tuple[bool, torch.Tensor]]]]] = []

    @property
    def active_edits(self) -> list[Edit]:
        return [edit for edit, _ in self._entries]

    @property
    def touched_rows(self) -> dict[Key, list[int]]:
        """Rows that differ (or may differ) from pristine now, per (parameter, dim)."""
        return {key: sorted(rows) for key, rows in self._pristine.items()}

    def _param(self, name: str) -> torch.nn.Parameter:
        try:
            return self._model.get_parameter(name)
        except AttributeError as exc:
            raise EditError(f"the model has no parameter {name!r}") from exc

    # ----- building an edit ------------------------------------------------------------------------------
    def _operations(self, changes: Sequence[SliceChange]) -> dict[Key, dict[int, tuple[bool, torch.Tensor]]]:
        """Changes checked and merged per row (applied in order: add+add sums, set replaces, set+add adds)."""
        ops: dict[Key, dict[int, tuple[bool, torch.Tensor]]] = {}
        for change in changes:
            param = self._param(change.name)
            if change.dim not in range(param.dim()):
                raise EditError(f"{change.name} has {param.dim()} dims; cannot edit along dim {change.dim}")
            for name, dim in self._pristine:
                if name == change.name and dim != change.dim:
                    raise EditError(f"{change.name} is already edited along dim {dim}, not {change.dim}")
            index = torch.as_tensor(change.index, dtype=torch.long).flatten().cpu()
            n_rows = param.shape[change.dim]
            if index.numel() and (int(index.min()) < 0 or int(index.max()) >= n_rows):
                raise EditError(f"rows {index.tolist()} out of range for {change.name} (size {n_rows} along dim {change.dim})")
            if len(set(index.tolist())) != index.numel():
                raise EditError(f"repeated rows in one change of {change.name}: {index.tolist()}")
            expected = list(param.shape)
            expected[change.dim] = index.numel()
            if list(change.value.shape) != expected:
                raise EditError(f"change of {change.name} has shape {tuple(change.value.shape)}, expected {tuple(expected)}")
            value = change.value.detach().to("cpu", param.dtype)
            rows = ops.setdefault((change.name, change.dim), {})
            for j, row in enumerate(index.tolist()):
                vec = value.select(change.dim, j).clone()
                if row in rows and change.additive:
                    was_additive, old = rows[row]
                    rows[row] = (was_additive, old + vec)
                else:
                    rows[row] = (change.additive, vec)
        return ops

    def _value(self, key: Key, row: int) -> torch.Tensor:
        """Pristine, then every active edit's operation on (key, row), in order."""
        value = self._pristine[key][row]
        for _, ops in self._entries:
            op = ops.get(key, {}).get(row)
            if op is not None:
                additive, vec = op
                value = value + vec if additive else vec
        return value

    def _rewrite(self, key: Key, rows: list[int]) -> None:
        _write_rows(self._param(key[0]), key[1], rows, [self._value(key, r) for r in rows])

    def commit(self, km, editor: str, requests: Sequence[EditRequest], changes: Sequence[SliceChange], info: dict) -> Edit:
        if km.model is not self._model:
            raise EditError("this ledger belongs to another model")
        ops = self._operations(changes)
        if not ops:
            raise EditError("the edit changes nothing")
        edit = Edit(editor=editor, requests=tuple(requests), patches=[], model=km, info=dict(info), ledger=self)
        befores: dict[Key, torch.Tensor] = {}
        added: dict[Key, list[int]] = {}
        with torch.no_grad():
            for key, rows in ops.items():
                name, dim = key
                idx = torch.tensor(sorted(rows), dtype=torch.long)
                befores[key] = self._param(name).index_select(dim, idx.to(self._param(name).device)).detach().cpu().clone()
            try:
                for key, rows in ops.items():
                    known = self._pristine.setdefault(key, {})
                    for j, row in enumerate(sorted(rows)):
                        if row not in known:
                            known[row] = befores[key].select(key[1], j).clone()
                            added.setdefault(key, []).append(row)
                self._entries.append((edit, ops))
                for key, rows in ops.items():
                    self._rewrite(key, sorted(rows))
            except BaseException:
                # Put back exactly what was there, and forget this edit.
                self._entries = [(e, o) for e, o in self._entries if e is not edit]
                for key, before in befores.items():
                    _write_rows(self._param(key[0]), key[1], sorted(ops[key]), list(before.unbind(key[1])))
                for key, rows in added.items():
                    for row in rows:
                        self._pristine[key].pop(row, None)
                    if not self._pristine[key]:
                        del self._pristine[key]
                raise
            for key, rows in ops.items():
                name, dim = key
                idx = torch.tensor(sorted(rows), dtype=torch.long)
                param = self._param(name)
                after = param.index_select(dim, idx.to(param.device)).detach().cpu().clone()
                additive = all(rows[r][0] for r in sorted(rows))
                delta = torch.stack([rows[r][1] for r in sorted(rows)], dim=dim) if additive else None
                edit.patches.append(ParamPatch(name, dim, idx, befores[key], after, delta))
        return edit

    # ----- reverting ---------------------------------------------------------------------------------------
    def revert(self, edit: Edit) -> None:
        found = [ops for e, ops in self._entries if e is edit]
        if not found:
            raise EditError("this edit is not active on this model (already reverted?)")
        ops = found[0]
        with torch.no_grad():
            self._entries = [(e, o) for e, o in self._entries if e is not edit]
            for key, rows in ops.items():
                still = {r for _, o in self._entries for r in o.get(key, {})}
                rows = sorted(rows)
                self._rewrite(key, rows)
                for row in rows:
                    if row not in still:
                        del self._pristine[key][row]
                if not self._pristine[key]:
                    del self._pristine[key]
        edit.active = False

    def revert_all(self) -> None:
        """Revert every active edit, newest first."""
        for edit in reversed(self.active_edits):
            edit.revert()


def active_edits(km) -> list[Any]:
    """The edits applied to ``km`` and not reverted, oldest first."""
    ledger = km.model.__dict__.get(_ATTR)
    return ledger.active_edits if ledger is not None else []
