"""Several weight changes in one forward, each carried by its own rows of the batch.

An edit changes slices of a few matrices (a value vector, a rank-one update, a layer's MLP). To run many edited
models in one batch, each row of the batch gets its own change: the model keeps its weights, and a forward hook on
each changed linear layer adds to that row's output what the change would have added,

    y_row = x_row Wᵀ + x_row ΔWᵀ  (+ Δb)          with ΔW nonzero only on the changed slices,

which equals the edited layer's output x_row (W + ΔW)ᵀ up to float rounding. Memory-bound work such as greedy
decoding (every step reads every weight) then costs about what one edited model costs, for many edits.

A change of a parameter that some module other than a linear layer (``nn.Linear`` or GPT-2's transposed
``Conv1D``) uses, e.g. a tied embedding or a norm, cannot be carried this way: :func:`row_change_plan` returns None
for it and the caller runs that edit on its own.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence

import torch
from torch import nn

if TYPE_CHECKING:
    from .model import KnModel


@dataclass(frozen=True)
class RowChange:
    """Parameter ``name`` changed by ``delta`` on its slices ``index`` [k] along ``dim``
    (``delta`` shaped like ``param.index_select(dim, index)``)."""

    name: str
    dim: int
    index: torch.Tensor
    delta: torch.Tensor


def _is_conv1d(module: nn.Module) -> bool:
    # transformers' Conv1D (GPT-2): weight [in, out], y = x W + b; not imported, so no hard dependency on its path
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf")


def _users(model: nn.Module) -> dict[int, list[tuple[nn.Module, str]]]:
    """id(parameter) → every (module, attribute) that holds it directly."""
    users: dict[int, list[tuple[nn.Module, str]]] = {}
    for module in model.modules():
        for attr, param in module.named_parameters(recurse=False):
            users.setdefault(id(param), []).append((module, attr))
    return users


def row_change_plan(km: KnModel, changes: Sequence[RowChange]) -> list[tuple[nn.Module, str, RowChange]] | None:
    """(linear module, "weight" | "bias", change) for each change; None where a changed parameter is used by a
    module that is not a linear layer (or by none), so the change cannot ride on rows."""
    users = _users(km.model)
    plan = []
    for change in changes:
        holders = users.get(id(km.model.get_parameter(change.name)), [])
        if not holders:
            return None
        for module, attr in holders:
            if not (isinstance(module, nn.Linear) or _is_conv1d(module)) or attr not in ("weight", "bias"):
                return None
            plan.append((module, attr, change))
    return plan


def _added(module: nn.Module, attr: str, change: RowChange, x: torch.Tensor, out_shape) -> torch.Tensor:
    """What ``change`` adds to ``module``'s output (``out_shape``) for input rows ``x`` [r, ..., in]."""
    delta = change.delta.to(device=x.device, dtype=x.dtype)
    index = change.index.to(x.device)
    conv = _is_conv1d(module)
    # weight: nn.Linear stores [out, in], Conv1D [in, out]; the changed slices lie along the input or output axis
    if attr == "weight" and (change.dim == 1) != conv:  # columns of [out, in]: only the changed inputs contribute
        return x[..., index] @ (delta if conv else delta.transpose(0, 1))  # [k, out]
    added = torch.zeros(out_shape, device=x.device, dtype=x.dtype)
    if attr == "bias":
        added[..., index] = delta
    else:  # rows of [out, in]: only the changed outputs receive
        added[..., index] = x @ (delta.transpose(0, 1) if conv else delta).transpose(0, 1)
    return added


@contextmanager
def rows_carry(km: KnModel, plans: Sequence[Sequence[tuple[nn.Module, str, RowChange]]],
               rows: Sequence[Sequence[int]]) -> Iterator[None]:
    """While inside, every forward of ``km`` adds plan g's changes to the outputs of batch rows ``rows[g]``
    (plans from :func:`row_change_plan`; the batch's rows must be laid out as ``rows`` says, in every forward)."""
    per_module: dict[int, tuple[nn.Module, list]] = {}
    for plan, group in zip(plans, rows):
        if not len(group):
            continue
        at = torch.tensor(list(group), dtype=torch.long)  # made once, not at every forward of every step
        for module, attr, change in plan:
            per_module.setdefault(id(module), (module, []))[1].append((attr, change, at))

    def hook(module, args, output):
        x = args[0]
        for attr, change, at in per_module[id(module)][1]:
            at = at.to(output.device)
            rows_out = output[at]
            output[at] = rows_out + _added(module, attr, change, x[at], rows_out.shape)
        return output

    handles = [module.register_forward_hook(hook) for module, _ in per_module.values()]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


__all__ = ["RowChange", "row_change_plan", "rows_carry"]
