"""The editor interface every editing method implements, and the revertible Edit handle it returns.

An edit is a set of ParamPatches: for one parameter, the slices it touched along one dimension, with
copies of the values before and after. Nothing else of the model is copied.

Edits made through :func:`kn_edit.editing.ledger.commit` (every editor in kn-edit) are kept in the model's
ledger, which holds the pristine value of every touched slice: they can be reverted in any order and the
model comes back bit for bit. An ``Edit`` built by hand (``ledger=None``) reverts by writing ``before``
back, which is exact only when it is the last edit still applied to those slices.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch

from ..errors import EditError


@dataclass(frozen=True)
class EditRequest:
    """One fact to change. ``new=None`` asks to erase ``old`` (the current object) instead.

    prompts: texts that express the fact with the answer slot at the end (causal) or marked (masked LM).
    """

    prompts: tuple[str, ...]
    old: str
    new: str | None = None
    subject: str | None = None
    relation: str | None = None

    def __post_init__(self) -> None:
        if isinstance(self.prompts, str):
            object.__setattr__(self, "prompts", (self.prompts,))
        object.__setattr__(self, "prompts", tuple(self.prompts))
        if not self.prompts:
            raise EditError("an edit request needs at least one prompt")
        if not isinstance(self.old, str) or not self.old.strip():
            raise EditError("an edit request needs the current object (old)")
        if self.new is not None and self.new.strip() == self.old.strip():
            raise EditError(f"old and new are the same ({self.old!r}): nothing to edit")

    @property
    def is_erasure(self) -> bool:
        return self.new is None


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
    """Handle on an applied edit. ``revert()`` takes it back; once every edit of a slice is reverted, the
    slice holds its original values bit for bit. ``info`` says what the editor did (JSON-friendly)."""

    editor: str
    requests: tuple[EditRequest, ...]
    patches: list[ParamPatch]
    model: Any  # the KnModel the edit was applied to
    info: dict[str, Any] = field(default_factory=dict)
    active: bool = True
    ledger: Any = field(default=None, repr=False)  # the model's Ledger when made through ledger.commit

    def _param(self, name: str) -> torch.nn.Parameter:
        return self.model.model.get_parameter(name)

    def revert(self) -> None:
        if not self.active:
            raise EditError("this edit was already reverted")
        if self.ledger is not None:
            self.ledger.revert(self)
            return
        with torch.no_grad():
            for patch in reversed(self.patches):
                param = self._param(patch.name)
                param.index_copy_(patch.dim, patch.index.to(param.device), patch.before.to(param.device, param.dtype))
        self.active = False

    def save(self, path) -> None:
        """Write this edit as a patch file (safetensors + JSON metadata), atomically; see ``apply_patch``."""
        from .patchfile import save_patch

        save_patch(self, path)

    @property
    def touched_parameters(self) -> list[str]:
        return sorted({p.name for p in self.patches})


class Editor(ABC):
    """An editing method. ``apply`` must leave the model unchanged if it raises."""

    name: str = "editor"

    @abstractmethod
    def apply(self, km, requests: Sequence[EditRequest]) -> Edit:
        """Apply every request at once and return the handle that reverts them."""
