"""The editor interface every editing method implements, and the revertible Edit handle it returns.

An edit is a set of ParamPatches: for one parameter, the slices it touched along one dimension, with
copies of the values before and after. Nothing else of the model is copied.

Every edit is made through :func:`kn_edit.editing.ledger.commit`: the model's ledger holds the pristine value
of every touched slice, so edits can be reverted in any order and the model comes back bit for bit. A patch
may cover a whole parameter (ROME and fine-tuning change every column of a matrix).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Sequence

import torch

from ..errors import EditError
from ..prompts import normalize

if TYPE_CHECKING:
    from .ledger import SliceChange
    from .report import EditReport


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
    """Handle on an applied edit, made by the model's ledger (:func:`kn_edit.editing.ledger.commit`).
    ``revert()`` takes it back; once every edit of a slice is reverted, the slice holds its original values
    bit for bit, whatever the order. ``report`` says what the editor did (:class:`EditReport`)."""

    editor: str
    requests: tuple[EditRequest, ...]
    patches: list[ParamPatch]
    model: Any  # the KnModel the edit was applied to
    ledger: Any = field(repr=False)  # the model's Ledger: the one way back
    report: EditReport | None = None
    active: bool = True

    def revert(self) -> None:
        if not self.active:
            raise EditError("this edit was already reverted")
        self.ledger.revert(self)

    def save(self, path) -> None:
        """Write this edit as a patch file (safetensors + JSON metadata), atomically; see ``apply_patch``."""
        from .patchfile import save_patch

        save_patch(self, path)

    @property
    def touched_parameters(self) -> list[str]:
        return sorted({p.name for p in self.patches})


class Editor(ABC):
    """An editing method. Subclasses implement :meth:`compute` (the changes, and the method's own details);
    :meth:`apply` commits them through the model's ledger and fills the report the same way for every method.

    Class attributes: ``name`` (the registry name), ``can_update`` / ``can_erase`` (which requests it takes).
    """

    name: ClassVar[str] = "editor"
    can_update: ClassVar[bool] = True
    can_erase: ClassVar[bool] = False

    def check_requests(self, requests: Sequence[EditRequest]) -> list[EditRequest]:
        requests = list(requests)
        if not requests:
            raise EditError("no edit requests")
        for r in requests:
            if not isinstance(r, EditRequest):
                raise EditError(f"edit requests must be EditRequest objects, got {type(r).__name__}")
            if r.is_erasure and not self.can_erase:
                raise EditError(f"{self.name} cannot erase facts (request {r.old!r} has no new object); "
                                "choose a method that can erase, e.g. kn-erase")
            if not r.is_erasure and not self.can_update:
                raise EditError(f"{self.name} only erases facts; request {r.old!r} → {r.new!r} is an update")
        wanted: dict[str, EditRequest] = {}  # one batch cannot ask one prompt for two new objects
        for r in requests:
            for prompt in r.prompts:
                key = normalize(prompt)
                seen = wanted.setdefault(key, r)
                if seen.new != r.new:
                    raise EditError(f"prompt {prompt!r} is asked for {seen.new!r} and for {r.new!r} in one batch; give "
                                    "each fact one new object")
        facts: dict[tuple[str, str], EditRequest] = {}  # nor one fact (subject, relation) two new objects
        for r in requests:
            if r.subject is None or r.relation is None:
                continue
            seen = facts.setdefault((normalize(r.subject), r.relation), r)
            if seen.new != r.new:
                raise EditError(f"{r.subject!r} ({r.relation}) is asked for {seen.new!r} and for {r.new!r} in one "
                                "batch; give each fact one new object")
        return requests

    def apply(self, km, requests: Sequence[EditRequest]) -> Edit:
        """Apply every request at once and return the handle that reverts them. If this raises (a refused
        edit, an error, an interrupt), the model is left as it was."""
        from .ledger import commit
        from .report import EditReport, measured, parameter_changes, prompt_outcomes

        requests = self.check_requests(requests)
        with measured(km.device) as cost:
            changes, details = self.compute(km, requests)
            edit = commit(km, self.name, requests, changes)
        try:
            edit.report = EditReport(
                method=self.name, prompts=prompt_outcomes(km, requests), parameters=parameter_changes(km, edit.patches),
                seconds=cost.seconds, peak_memory_mb=cost.peak_memory_mb, memory_kind=cost.memory_kind,
                neurons=list(getattr(details, "neurons", None) or []), details=details,
            )
        except BaseException:
            edit.revert()
            raise
        return edit

    @abstractmethod
    def compute(self, km, requests: list[EditRequest]) -> tuple[list[SliceChange], Any]:
        """(changes to make, the method's details). The model must be as before when this returns or raises
        (trial changes go through the ledger and are reverted)."""
