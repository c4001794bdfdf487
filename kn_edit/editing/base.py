"""The editor interface every editing method implements.

An editor computes the changes a request needs; :meth:`Editor.apply` commits them through the model's edit
ledger (:mod:`kn_edit.editing.ledger`, which makes the revertible :class:`Edit`) and fills one report. The
request record (:class:`EditRequest`) lives with the data records; both are re-exported here, where users
have always imported them from.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, Any, ClassVar, Sequence

from ..data.records import EditRequest
from ..errors import EditError
from ..models.prompts import normalize
from .ledger import Edit, ParamPatch, SliceChange, commit
from .report import EditReport, PhaseTimer, measured, parameter_changes, prompt_outcomes

if TYPE_CHECKING:
    from ..models.model import KnModel


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

    @property
    def timer(self) -> PhaseTimer:
        """The timer of the edit in progress: ``with self.timer("solve"):`` in :meth:`compute` charges the block
        to phase "solve" of the report's ``timings``. Outside :meth:`apply`, a timer nobody reads."""
        return getattr(self, "_timer", None) or PhaseTimer()

    def apply(self, km: KnModel, requests: Sequence[EditRequest]) -> Edit:
        """Apply every request at once and return the handle that reverts them. If this raises (a refused
        edit, an error, an interrupt), the model is left as it was. The report's seconds cover all of it:
        the method's phases (``timings``), committing, and judging the edit prompts."""
        requests = self.check_requests(requests)
        timer, outer = PhaseTimer(km.device), getattr(self, "_timer", None)
        self._timer, edit = timer, None
        try:
            with measured(km.device) as cost:
                changes, details = self.compute(km, requests)
                with timer("commit"):
                    edit = commit(km, self.name, requests, changes)
                with timer("report"):
                    prompts, parameters = prompt_outcomes(km, requests), parameter_changes(km, edit.patches)
            edit.report = EditReport(
                method=self.name, prompts=prompts, parameters=parameters, seconds=cost.seconds,
                peak_memory_mb=cost.peak_memory_mb, memory_kind=cost.memory_kind,
                neurons=list(getattr(details, "neurons", None) or []), details=details,
                timings=timer.timings(cost.seconds),
            )
        except BaseException:
            if edit is not None:
                edit.revert()
            raise
        finally:
            self._timer = outer
        return edit

    @abstractmethod
    def compute(self, km: KnModel, requests: list[EditRequest]) -> tuple[list[SliceChange], Any]:
        """(changes to make, the method's details). The model must be as before when this returns or raises
        (trial changes go through the ledger and are reverted)."""


__all__ = ["Edit", "EditRequest", "Editor", "ParamPatch", "SliceChange"]
