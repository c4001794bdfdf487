"""What every way of editing one fact goes through before the method runs (``kn-edit update-fact`` and
:func:`update_fact`): the default method for the model, the subject found from the prompts when the method needs
one and none is given (:mod:`kn_edit.locating.subject`), and the refusal of an edit of a fact the model does not
predict (unless forced). Evaluations call the editors directly and keep their own ``only_known`` setting."""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Iterable, Sequence

from ..data.records import EditRequest
from ..errors import ConfigError
from ..locating.subject import SubjectGuess, find_subject
from ..progress import Reporter
from .knowledge_neurons import KnowledgeNeuronEditor
from .ledger import Edit
from .registry import make_editor, needs_subject, resolve
from .targets import require_predicted

if TYPE_CHECKING:
    from ..models.model import KnModel
    from ..models.neurons import Neuron
    from .knowledge_neurons import Locator

# kn-subject keeps the neighbours that share the object (kn moves them: its neurons fire at the answer slot that
# every subject of the relation shares); masked LMs have no "subject before the answer", so they keep kn.
CAUSAL_DEFAULT, MASKED_DEFAULT = "kn-subject", "kn"


def default_method(km: KnModel) -> str:
    """The update method used when none is named: kn-subject for causal LMs, kn for masked LMs."""
    return MASKED_DEFAULT if km.is_masked_lm else CAUSAL_DEFAULT


def with_subjects(km: KnModel, requests: Sequence[EditRequest], method: str) -> tuple[list[EditRequest], list[SubjectGuess | None]]:
    """The requests with a subject found for each one that has none, where ``method`` needs one (causal LMs; a
    masked LM is left to the method's own error); the guesses (None where nothing was found)."""
    out, guesses = [], []
    for request in requests:
        if request.subject or not needs_subject(method) or km.is_masked_lm:
            out.append(request)
            guesses.append(None)
            continue
        guess = find_subject(km, request.prompts, request.old)
        out.append(dataclasses.replace(request, subject=guess.subject))
        guesses.append(guess)
    return out, guesses


def refuse_unknown(km: KnModel, requests: Iterable[EditRequest], force: bool) -> None:
    """An EditError unless the model's greedy answer on every edit prompt is the request's old object (``force``:
    no check). One place for every method; the knowledge-neuron editors also check it themselves."""
    if force:
        return
    for request in requests:
        if not request.is_erasure:
            require_predicted(km, request.prompts, request.old, force=False)


def update_fact(km: KnModel, prompts: Sequence[str] | str, old: str, new: str, rule: str | None = None,
                neurons: Iterable[Neuron] | None = None, *, method: str | None = None, subject: str | None = None,
                force: bool = False, relation: str | None = None, relation_neurons: Sequence[Iterable[Neuron]] | None = None,
                locator: Locator | None = None, reporter: Reporter | None = None, **settings) -> Edit:
    """Change the fact that ``prompts`` complete with ``old`` so that they complete with ``new``.

    method: a registry name (default: kn-subject for causal LMs, kn for masked LMs; kn when a knowledge-neuron
    argument ``rule``, ``neurons``, ``relation_neurons`` or ``locator`` is given). subject: found from the prompts
    when the method needs one and none is given (the edit's ``requests[0].subject`` holds it). force: edit even
    where the model's greedy answer is not ``old``. settings: the method's settings (e.g. margin=2.0, layer=6).
    """
    if isinstance(neurons, int) and not isinstance(neurons, bool):  # kn-subject's setting: how many neurons
        settings["neurons"], neurons = neurons, None
    kn_args = [k for k, v in (("rule", rule), ("neurons", neurons), ("relation_neurons", relation_neurons),
                              ("locator", locator)) if v is not None]  # fmt: skip
    method = method or ("kn" if kn_args else default_method(km))
    cls, presets, name = resolve(method)
    knowledge_neurons = issubclass(cls, KnowledgeNeuronEditor)
    if kn_args and not knowledge_neurons:
        raise ConfigError(f"{', '.join(kn_args)}: knowledge-neuron arguments, which {name} does not take")
    request = EditRequest(prompts, old, new, subject=subject, relation=relation or ("_" if relation_neurons else None))
    if knowledge_neurons:  # the editor first: bad settings fail before anything is computed
        editor = cls(neurons=neurons, locator=locator, reporter=reporter, rule=rule or presets.get("rule", "signed"),
                     relation_neurons={request.relation: list(relation_neurons)} if relation_neurons else None,
                     force=force, **settings)  # fmt: skip
    else:
        editor = make_editor(method, overrides=settings, reporter=reporter)
    (request,), _ = with_subjects(km, [request], method)
    refuse_unknown(km, [request], force)
    return editor.apply(km, [request])
