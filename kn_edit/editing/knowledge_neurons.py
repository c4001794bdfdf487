"""The knowledge-neuron editors: update a fact (old → new) or erase it by changing the value vectors of its
knowledge neurons. Both implement :class:`Editor`; ``update_fact`` / ``erase_fact`` / ``erase_relation`` are
the one-call forms. Every edit goes through the model's ledger, so it is revertible in any order.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import TYPE_CHECKING, Callable, Iterable, Mapping, Sequence

import torch

from ..errors import EditError
from ..models.neurons import Neuron
from ..progress import NullReporter, Reporter, track
from .base import Edit, Editor, EditRequest
from .filters import GENERIC_PROMPTS, drop_generic, drop_relation_shared, shared_by, slot_activations
from .nullspace import neuron_projector, project_neurons
from .guard import guard_edit
from .preserve import preservation_metric
from .ledger import commit
from .rules import paper_deltas, signed_direction, signed_unit_deltas, unscaled_deltas
from .sensitivity import least_norm_step, step_value_gradients
from .settings import EraseSettings, LocateSettings, RelationEraseSettings, UpdateSettings, with_overrides
from .targets import UpdateTarget, embedding, margins, require_predicted, update_target
from .values import checked, value_changes, value_vectors

if TYPE_CHECKING:
    from ..models.model import KnModel


@dataclass
class NeuronChange:
    """An edited neuron: its mean attribution score (NaN when given by hand) and mean activation at the answer."""

    layer: int
    index: int
    score: float
    activation: float


@dataclass
class DroppedNeuron:
    layer: int
    index: int
    reason: str  # generic | relation-shared | max_neurons


@dataclass
class KnRequestDetails:
    """What the knowledge-neuron editor did for one request."""

    old: str
    new: str | None
    neurons: list[NeuronChange]
    dropped: list[DroppedNeuron] = field(default_factory=list)
    unpredicted: list[tuple[str, str]] = field(default_factory=list)  # (prompt, predicted) where forced
    scale: float | None = None  # signed rule: ‖δ‖/‖V‖ (gradient) or the shift s (contrast, new)
    fallback: str | None = None  # why the relation-share filter was given up, if it was
    negative_activations: int = 0


@dataclass
class KnDetails:
    """The knowledge-neuron editors' details (``EditReport.details``)."""

    rule: str  # signed | paper | unscaled | erase-zero | erase-unk | erase-relation-zero | ...
    embedding: str
    settings: dict
    requests: list[KnRequestDetails]
    neurons: list[Neuron] = field(metadata={"show": False})  # every edited neuron, in request order (the report has them)
    relation_counts: list[int] = field(default_factory=list)  # erase-relation: facts that located each neuron
    text_change: float | None = None  # signed rule: perplexity change on the guard's text sample (kn_edit.editing.guard)

    @property
    def scale(self) -> float | None:
        return self.requests[0].scale if len(self.requests) == 1 else None


@dataclass
class Located:
    """Neurons of one fact, strongest first, with their mean attribution scores (NaN where given by hand)."""

    neurons: list[Neuron]
    scores: list[float]


# locator(km, prompts, target, settings) → Located. Swap it to cache or to use another attribution method.
Locator = Callable[[object, Sequence[str], str, LocateSettings], Located]


def default_locator(km: KnModel, prompts: Sequence[str], target: str, settings: LocateSettings) -> Located:
    from ..locating.locate import locate_detailed

    found = locate_detailed(km, list(prompts), target, settings.threshold, settings.share, settings.steps, settings.layers)
    return Located(list(found.neurons), list(found.mean_scores))


def _given(neurons, n_requests: int) -> list[Located | None]:
    """Per request: the neurons the caller gave (a flat list for a single request, or one list per request)."""
    if neurons is None:
        return [None] * n_requests
    neurons = list(neurons)
    if neurons and all(isinstance(n, Neuron) for n in neurons):
        if n_requests != 1:
            raise EditError("with several requests, give one list of neurons per request")
        neurons = [neurons]
    if len(neurons) != n_requests:
        raise EditError(f"{len(neurons)} neuron lists for {n_requests} requests")
    return [None if ns is None else Located(list(ns), [float("nan")] * len(list(ns))) for ns in neurons]


@dataclass
class _Plan:
    """One request, located and filtered. activation [n]: mean a_i over the prompts at the answer step."""

    request: EditRequest
    neurons: list[Neuron]
    scores: list[float]
    activation: torch.Tensor
    dropped: list[dict] = field(default_factory=list)
    unpredicted: list[tuple[str, str]] = field(default_factory=list)
    target: UpdateTarget | None = None
    # with the relation-share filter on: the plan without it, to fall back on; and why it was used
    without_relation_filter: Callable[[], "_Plan"] | None = None
    fallback: str | None = None


def _request_details(plan: _Plan, scale: float | None = None) -> KnRequestDetails:
    return KnRequestDetails(
        old=plan.request.old, new=plan.request.new,
        neurons=[NeuronChange(n.layer, n.index, float(s), float(a))
                 for n, s, a in zip(plan.neurons, plan.scores, plan.activation.tolist())],
        dropped=[DroppedNeuron(**d) for d in plan.dropped], unpredicted=list(plan.unpredicted), scale=scale,
        fallback=plan.fallback, negative_activations=int((plan.activation < 0).sum()),
    )


def _settings_dict(settings) -> dict:
    return {k: (v.value if isinstance(v, Enum) else v) for k, v in vars(settings).items()}


def _embedding_kind(km: KnModel) -> str:
    return "tied input/output embedding" if km.embeddings_tied else "output embedding (unembedding)"


class _NeuronEditor(Editor):
    """What updating and erasing share: locating, activations at the answer step, generic filters."""

    def __init__(self, settings, neurons, locator: Locator | None, generic_prompts: Sequence[str] | None,
                 relation_neurons: Mapping[str, Sequence[Iterable[Neuron]]] | None, reporter: Reporter | None):
        self.settings = settings
        self._neurons = neurons
        self._locator = locator or default_locator
        self.generic_prompts = tuple(generic_prompts) if generic_prompts is not None else GENERIC_PROMPTS
        self.relation_neurons = dict(relation_neurons or {})
        self.reporter = reporter or NullReporter()

    def _plans(self, km: KnModel, requests: list[EditRequest], plan_one: Callable) -> list[_Plan]:
        """plan_one(request, given, generic) for each request in turn, with progress; given: the caller's
        neurons for it (or None), generic: the generic-prompt activations (or None, filter off)."""
        plans = []
        with self.timer("prepare"), self.reporter.task("locating knowledge neurons", total=len(requests)) as task:
            generic = self._generic(km)
            for request, given in zip(requests, _given(self._neurons, len(requests))):
                plans.append(plan_one(request, given, generic))
                task.advance()
        return plans

    def _locate(self, km: KnModel, request: EditRequest, given: Located | None) -> Located:
        """The caller's neurons (checked) or, without them, the located ones."""
        if given is not None:
            return Located(checked(km, given.neurons), given.scores)
        with self.timer("locate"):
            return self._locator(km, request.prompts, request.old, self.settings)

    def _plan(self, request: EditRequest, located: Located, acts: torch.Tensor, by_hand: bool,
              generic: torch.Tensor | None, sets, unpredicted: list[tuple[str, str]]) -> _Plan:
        """Filter the located neurons: relation-share (``sets``), generic (``generic``), max_neurons; neurons
        given by hand (``by_hand``) are edited as given. acts [n_prompts, n_layers, d_ff]: the activations at
        the answer steps that count."""
        by_neuron = lambda ns: acts[:, [n.layer for n in ns], [n.index for n in ns]]  # noqa: E731  [n_prompts, n]
        neurons, scores = list(located.neurons), list(located.scores)
        dropped: list[dict] = []
        if by_hand:
            sets, generic = None, None
        if sets:
            kept, out = drop_relation_shared(neurons, sets, self.settings.relation_share)
            dropped += [{"layer": n.layer, "index": n.index, "reason": "relation-shared"} for n in out]
            scores = [s for n, s in zip(neurons, scores) if n in set(kept)]
            neurons = kept
        if generic is not None and neurons:
            kept, out = drop_generic(neurons, by_neuron(neurons).abs().mean(dim=0), generic, self.settings.generic_ratio)
            dropped += [{"layer": n.layer, "index": n.index, "reason": "generic"} for n in out]
            scores = [s for n, s in zip(neurons, scores) if n in set(kept)]
            neurons = kept
        if not by_hand and self.settings.max_neurons is not None and len(neurons) > self.settings.max_neurons:
            order = sorted(range(len(neurons)), key=lambda j: -scores[j] if scores[j] == scores[j] else 0.0)
            keep = sorted(order[: self.settings.max_neurons])
            dropped += [{"layer": neurons[j].layer, "index": neurons[j].index, "reason": "max_neurons"}
                        for j in range(len(neurons)) if j not in keep]
            neurons, scores = [neurons[j] for j in keep], [scores[j] for j in keep]
        if not neurons:
            why = f" ({len(dropped)} dropped by the generic-neuron filters)" if dropped else ""
            raise EditError(
                f"no knowledge neurons to edit for {request.old!r} after {request.prompts[0]!r}{why}; lower the "
                "locating threshold, give more prompts, or turn the filters off (generic_filter=false)"
            )
        activation = by_neuron(neurons).mean(dim=0)
        return _Plan(request, neurons, scores, activation, dropped, unpredicted)

    def _generic(self, km: KnModel) -> torch.Tensor | None:
        if not self.settings.generic_filter:
            return None
        return slot_activations(km, self.generic_prompts, self.settings.generic_quantile)


class KnowledgeNeuronEditor(_NeuronEditor):
    """Update facts old → new by moving their knowledge neurons' value vectors (rules: kn_edit.editing.rules).

    neurons: the neurons to edit instead of locating them (a list for one request, or one list per request).
    relation_neurons: {relation: [neuron set of each of its facts]}; requests with that ``relation`` drop
    neurons shared by more than ``relation_share`` of them. locator: how neurons are found (default: locate).
    """

    config_class = UpdateSettings

    def __init__(self, settings: UpdateSettings | None = None, *, neurons=None, locator: Locator | None = None,
                 generic_prompts: Sequence[str] | None = None,
                 relation_neurons: Mapping[str, Sequence[Iterable[Neuron]]] | None = None,
                 guard_texts: Sequence[str] | None = None, reporter: Reporter | None = None, **overrides) -> None:
        super().__init__(with_overrides(settings or UpdateSettings(), overrides), neurons, locator, generic_prompts,
                         relation_neurons, reporter)
        self.guard_texts = tuple(guard_texts) if guard_texts is not None else None  # None: the guard's own sample

    @property
    def name(self) -> str:  # the registry name of the rule
        return "kn" if self.settings.rule == "signed" else f"kn-{self.settings.rule}"

    def compute(self, km: KnModel, requests: list[EditRequest]) -> tuple[list, KnDetails]:
        s = self.settings
        plans = self._plans(km, requests, lambda request, given, generic: self._plan_or_fallback(km, request, given, generic))
        with self.timer("solve"):
            neurons, deltas, scales = (self._signed if s.rule == "signed" else self._fixed)(km, plans)
        changes = value_changes(km, neurons, deltas, additive=True)
        text = None
        if s.rule == "signed":  # the text-damage guard: refuses (model unchanged) beyond max_text_change
            what = ", ".join(f"{r.old!r} → {r.new!r}" for r in requests)
            with self.timer("guard"):
                text = guard_edit(km, changes, s.max_text_change, what, self.guard_texts).change
        details = KnDetails(rule=str(s.rule), embedding=_embedding_kind(km), settings=_settings_dict(s),
                            requests=[_request_details(p, scale) for p, scale in zip(plans, scales)], neurons=neurons,
                            text_change=text)
        return changes, details

    def _relation_sets(self, request: EditRequest, given: Located | None):
        """The neuron sets of the request's relation for the relation-share filter, or None where it does not
        apply (neurons given by hand, no relation, or no sets for it)."""
        if given is not None or request.relation is None:
            return None
        return self.relation_neurons.get(request.relation) or None

    def _plan_or_fallback(self, km: KnModel, request: EditRequest, given: Located | None,
                          generic: torch.Tensor | None) -> _Plan:
        """The plan with the relation-share filter; where that filter applies, dropped neurons and
        ``relation_fallback`` is on, also the way back to the plan without it (used when the filter leaves no
        neuron, or, for the signed rule, when the remaining neurons cannot reach the margin). The fact is
        located once for both."""
        target = update_target(km, request.prompts, request.old, request.new)
        misses = require_predicted(km, request.prompts, request.old, self.settings.force)
        located = self._locate(km, request, given)
        acts = km.activations(list(target.new_steps))  # [n_prompts, n_layers, d_ff]
        sets = self._relation_sets(request, given)

        def plan(with_sets) -> _Plan:
            made = self._plan(request, located, acts, given is not None, generic, with_sets, misses)
            made.target = target
            return made

        try:
            planned = plan(sets)
        except EditError:
            if not (sets and self.settings.relation_fallback):
                raise
            planned = plan(None)
            planned.fallback = "the relation-share filter left no neuron"
            return planned
        filtered_out = any(d["reason"] == "relation-shared" for d in planned.dropped)
        if filtered_out and self.settings.relation_fallback:
            planned.without_relation_filter = lambda: plan(None)
        return planned

    # ----- rules ---------------------------------------------------------------------------------------
    def _fixed(self, km: KnModel, plans: list[_Plan]) -> tuple[list[Neuron], torch.Tensor, list[float | None]]:
        """paper / unscaled: deltas from the current value vectors; no search, no scale."""
        s = self.settings
        neurons, deltas = [], []
        for plan in plans:
            e_old, e_new = embedding(km, plan.target.old_ids), embedding(km, plan.target.new_ids)
            if s.rule == "paper":
                d = paper_deltas(value_vectors(km, plan.neurons), e_old, e_new, s.lambda_old, s.lambda_new)
            else:
                d = unscaled_deltas(len(plan.neurons), e_old, e_new, s.unscaled_factor)
            neurons += plan.neurons
            deltas.append(d)
        return neurons, torch.cat(deltas), [None] * len(plans)

    def _signed(self, km: KnModel, plans: list[_Plan]) -> tuple[list[Neuron], torch.Tensor, list[float | None]]:
        """The least change that makes new the top prediction with the margin on every edit prompt, each try
        applied and reverted exactly; with the relation-share filter's neurons first, then (relation_fallback)
        with all of them. Several requests: one joint solve (gradient direction, batch=joint), else per request
        in turn, on top of the earlier requests' deltas."""
        s = self.settings
        if s.direction == "gradient" and s.batch == "joint" and len(plans) > 1:
            return self._joint(km, plans)
        neurons: list[Neuron] = []
        deltas = torch.zeros(0, km.d_model)
        scales: list[float | None] = []
        with self.reporter.task("finding the least change", total=len(plans)) as task:
            for i, plan in enumerate(plans):
                change, scale, reached = self._attempt(km, plan, neurons, deltas)
                if not reached and plan.without_relation_filter is not None:
                    plan = plans[i] = plan.without_relation_filter()
                    plan.fallback = "the relation-specific neurons did not reach the margin"
                    change, scale, reached = self._attempt(km, plan, neurons, deltas)
                if not reached and s.on_failure == "raise":
                    raise EditError(self._refusal(repr(plan.request.new)))
                neurons, deltas = neurons + plan.neurons, torch.cat([deltas, change])
                scales.append(scale)
                task.advance()
        return neurons, deltas, scales

    def _attempt(self, km: KnModel, plan: _Plan, neurons: list[Neuron],
                 deltas: torch.Tensor) -> tuple[torch.Tensor, float, bool]:
        """(change [n, d_model] of plan's neurons, scale, reached) on top of the earlier requests' deltas."""
        s, t = self.settings, plan.target
        trial_neurons = neurons + plan.neurons
        if s.direction == "gradient":
            steps = [step for group in t.token_steps for step in group]  # every token of new on every prompt
            return self._solve(km, plan.neurons, steps, repr(plan.request.new), neurons, deltas)
        unit = self._signed_unit(km, plan)  # [n, d_model]

        def worst_margin(scale: float) -> float:
            trial = commit(km, "trial", [], value_changes(km, trial_neurons, torch.cat([deltas, scale * unit]), True))
            try:
                return float(margins(km, t.new_steps).min())
            finally:
                trial.revert()

        scale, reached = search_scale(worst_margin, s.margin, s.initial_scale, s.max_scale, s.bisect_steps)
        return scale * unit, scale, reached

    def _solve(self, km: KnModel, neurons: list[Neuron], steps: list, what: str, prior_neurons: list[Neuron],
               prior_deltas: torch.Tensor, hold: bool = False) -> tuple[torch.Tensor, float, bool]:
        """gradient direction: successive least-norm steps (kn_edit.editing.rules) on ``neurons``, on top of
        ``prior_deltas`` of ``prior_neurons``. Each step linearizes the margin (logit of the step's target
        minus the strongest other token) of every answer step (every token of new after every edit prompt,
        teacher-forced, so multi-token objects are edited whole; in a joint batch, every request's) around the
        current change and takes the least change that lifts the steps below the margin to margin + 0.5 (the
        half logit ends the iteration instead of creeping up on the margin). Where the margin saturates, the
        steps grow without end, so the change may not exceed max_change × ‖V‖ (V: the neurons' value vectors).
        hold: every step is a constraint of every iteration, those already past the margin with gain 0 (they may
        not fall back); without it only the steps below the margin are (enough for one fact, whose steps agree;
        the facts of a batch pull apart, and the ones left out fall back, iteration after iteration).
        Returns (change [n, d_model], ‖change‖ / ‖V‖, reached)."""
        s = self.settings
        size = float(value_vectors(km, neurons).norm())
        if size == 0:  # e.g. neurons erased before: the change limit (max_change × ‖V‖) is measured in ‖V‖
            names = ",".join(f"{n.layer}:{n.index}" for n in neurons)
            raise EditError(f"the value vectors of neurons {names} are all zero (erased?), so the gradient rule "
                            "has no scale for its change; edit other neurons, or use --method kn-paper / kn-unscaled")
        change = torch.zeros(len(neurons), km.d_model)
        metric = preservation_metric(km, neurons, self.generic_prompts, s.ridge) if s.preserve else None
        projector = self._null_projector(km, neurons) if s.null_space else None
        if projector is not None:
            metric = None  # the projection takes the metric's place: least norm within the null space
        trial_neurons = prior_neurons + neurons
        for it in track(self.reporter, range(s.solve_steps + 1), f"least change for {what}: steps"):
            trial = commit(km, "trial", [], value_changes(km, trial_neurons, torch.cat([prior_deltas, change]), True))
            try:
                margin, rival = margins(km, steps, with_rivals=True)
                if float(margin.min()) >= s.margin:
                    return change, float(change.norm()) / size, True
                if it == s.solve_steps:
                    break
                low = [j for j in range(len(steps)) if hold or margin[j] < s.margin]
                grads = step_value_gradients(km, [steps[j] for j in low], neurons, [int(rival[j]) for j in low])
            finally:
                trial.revert()
            gain = (s.margin + 0.5 - margin[low]).clamp(min=0.0)
            if projector is not None:  # ⟨g, P x⟩ = ⟨P g, x⟩: solve with projected gradients, keep the step in P's range
                step = project_neurons(projector, least_norm_step(project_neurons(projector, grads), gain, None))
            else:
                step = least_norm_step(grads, gain, metric)
            proposed = change + step
            if float(proposed.norm()) > s.max_change * size:
                break
            change = proposed
        return change, float(change.norm()) / size, False

    def _null_projector(self, km: KnModel, neurons: list[Neuron]) -> torch.Tensor:
        """P [n, n]: the null space of the neurons' co-activation over every token of the generic prompts and of
        the edit prompts of the model's active edits (earlier edits in a sequence stay put on these neurons)."""
        from .ledger import active_edits
        from .preserve import token_activations

        earlier = [p for edit in active_edits(km) for r in edit.requests for p in r.prompts]
        acts = token_activations(km, list(self.generic_prompts) + list(dict.fromkeys(earlier)), neurons)  # [T, n]
        return neuron_projector(acts.T.double() @ acts.double() / len(acts), self.settings.null_space_threshold)

    def _joint(self, km: KnModel, plans: list[_Plan]) -> tuple[list[Neuron], torch.Tensor, list[float | None]]:
        """batch=joint (gradient direction, several requests): one least-change problem whose constraints are
        every request's answer steps, over the union of their neurons; where it fails and the relation filter
        dropped neurons, once more with every located neuron (relation_fallback)."""
        def solve(current: list[_Plan]):
            neurons = list(dict.fromkeys(n for p in current for n in p.neurons))
            steps = [step for p in current for group in p.target.token_steps for step in group]
            return (neurons, *self._solve(km, neurons, steps, f"{len(current)} facts at once", [], torch.zeros(0, km.d_model),
                                          hold=True))

        neurons, change, scale, reached = solve(plans)
        if not reached and any(p.without_relation_filter is not None for p in plans):
            for i, plan in enumerate(plans):
                if plan.without_relation_filter is not None:
                    plans[i] = plan.without_relation_filter()
                    plans[i].fallback = "the relation-specific neurons did not reach the margin"
            neurons, change, scale, reached = solve(plans)
        if not reached and self.settings.on_failure == "raise":
            raise EditError(self._refusal(f"the {len(plans)} new objects"))
        return neurons, change, [scale] * len(plans)

    def _refusal(self, what: str) -> str:
        s = self.settings
        tried = (f"no change within {s.solve_steps} steps (solve_steps) and {s.max_change:g} × the value vectors' norm "
                 "(max_change) makes" if s.direction == "gradient" else
                 f"no scale up to max_scale={s.max_scale:g} makes")
        return (f"{tried} {what} the top prediction with margin {s.margin:g} on every edit prompt; the model is "
                "unchanged (raise that limit, lower margin, give more neurons, or set on_failure=apply to keep the "
                "last change tried)")

    def _signed_unit(self, km: KnModel, plan: _Plan) -> torch.Tensor:
        """The signed rule's deltas for s = 1 (before the earlier requests' deltas are applied)."""
        s, t = self.settings, plan.target
        d_hat = signed_direction(embedding(km, [t.old_token]), embedding(km, [t.new_token]), s.direction)
        return signed_unit_deltas(plan.activation, d_hat, s.weighting)


def search_scale(worst_margin: Callable[[float], float], margin: float, initial: float, maximum: float,
                 bisect_steps: int) -> tuple[float, bool]:
    """(scale, reached): the smallest scale (to bisection precision) with worst_margin(scale) >= margin,
    doubling from ``initial`` until it holds, then bisecting between the last failure and the first success.
    If even ``maximum`` fails: (the largest scale tried, False)."""
    low, high, scale = 0.0, None, initial
    while scale <= maximum * (1 + 1e-9):
        if worst_margin(scale) >= margin:
            high = scale
            break
        low, scale = scale, scale * 2
    if high is None:
        return low, False
    for _ in range(bisect_steps):
        mid = (low + high) / 2
        if worst_margin(mid) >= margin:
            high = mid
        else:
            low = mid
    return high, True


class KnowledgeNeuronEraser(_NeuronEditor):
    """Erase facts: set their knowledge neurons' value vectors to 0 (``mode="zero"``, the paper) or to the
    unknown token's embedding row (``mode="unk"``). Requests carry the target in ``old`` and no ``new``."""

    name = "kn-erase"
    config_class = EraseSettings
    can_update, can_erase = False, True

    def __init__(self, settings: EraseSettings | None = None, *, neurons=None, locator: Locator | None = None,
                 generic_prompts: Sequence[str] | None = None, reporter: Reporter | None = None, **overrides) -> None:
        super().__init__(with_overrides(settings or EraseSettings(), overrides), neurons, locator, generic_prompts,
                         None, reporter)

    def compute(self, km: KnModel, requests: list[EditRequest]) -> tuple[list, KnDetails]:
        s = self.settings

        def plan_one(request: EditRequest, given: Located | None, generic: torch.Tensor | None) -> _Plan:
            misses = require_predicted(km, request.prompts, request.old, s.force)
            located = self._locate(km, request, given)
            acts = km.activations([km.encode(p, request.old).steps[0] for p in request.prompts])
            return self._plan(request, located, acts, given is not None, generic, None, misses)

        plans = self._plans(km, requests, plan_one)
        neurons = [n for plan in plans for n in plan.neurons]
        values = erase_values(km, len(neurons), s.mode)
        details = KnDetails(rule=f"erase-{s.mode}", embedding=_embedding_kind(km), settings=_settings_dict(s),
                            requests=[_request_details(p) for p in plans], neurons=neurons)
        return value_changes(km, neurons, values, additive=False), details


def erase_values(km: KnModel, n: int, mode: str) -> torch.Tensor:
    """[n, d_model] new value vectors: zeros, or the unknown token's output-embedding row."""
    if mode == "zero":
        return torch.zeros(n, km.d_model)
    unk = getattr(km.tokenizer, "unk_token_id", None)
    if unk is None:
        raise EditError("this tokenizer has no unknown token; erase with mode='zero'")
    return embedding(km, [unk]).expand(n, -1).clone()


# ----- one-call forms --------------------------------------------------------------------------------------
def update_fact(km: KnModel, prompts: Sequence[str] | str, old: str, new: str, rule: str = "signed", neurons=None, *,
                subject: str | None = None, relation: str | None = None,
                relation_neurons: Sequence[Iterable[Neuron]] | None = None, locator: Locator | None = None,
                reporter: Reporter | None = None, **settings) -> Edit:
    """Change the fact that ``prompts`` complete with ``old`` so that they complete with ``new``.

    rule: ``signed`` (default), ``paper`` or ``unscaled`` (kn_edit.editing.rules). neurons: edit these
    instead of locating. relation_neurons: the neuron sets of the relation's other facts (enables the
    paper's relation-share filter). settings: any field of UpdateSettings (e.g. margin=2.0, force=True).
    """
    request = EditRequest(prompts, old, new, subject=subject, relation=relation or ("_" if relation_neurons else None))
    editor = KnowledgeNeuronEditor(
        neurons=neurons, locator=locator, reporter=reporter,
        relation_neurons={request.relation: list(relation_neurons)} if relation_neurons else None,
        rule=rule, **settings,
    )
    return editor.apply(km, [request])


def erase_fact(km: KnModel, prompts: Sequence[str] | str, target: str, mode: str = "zero", neurons=None, *,
               locator: Locator | None = None, reporter: Reporter | None = None, **settings) -> Edit:
    """Erase the fact that ``prompts`` complete with ``target`` (its knowledge neurons' value vectors set to 0,
    or to E(unknown token) with mode="unk"). settings: any field of EraseSettings."""
    editor = KnowledgeNeuronEraser(neurons=neurons, locator=locator, reporter=reporter, mode=mode, **settings)
    return editor.apply(km, [EditRequest(prompts, target)])


class KnowledgeNeuronRelationEraser(Editor):
    """Erase a relation (the paper): the neurons located for at least ``relation_share`` of its facts get value
    vectors 0 (or E(unk)). Requests: one erasure per fact of the relation (prompts, old = its object).
    neuron_sets: the facts' neuron sets, where already located (one per request, in order)."""

    name = "kn-erase-relation"
    config_class = RelationEraseSettings
    can_update, can_erase = False, True

    def __init__(self, settings: RelationEraseSettings | None = None, *, neuron_sets: Sequence[Iterable[Neuron]] | None = None,
                 locator: Locator | None = None, reporter: Reporter | None = None, **overrides) -> None:
        self.settings = with_overrides(settings or RelationEraseSettings(), overrides)
        self.neuron_sets = None if neuron_sets is None else [set(ns) for ns in neuron_sets]
        self._locator = locator or default_locator
        self.reporter = reporter or NullReporter()

    def compute(self, km: KnModel, requests: list[EditRequest]) -> tuple[list, KnDetails]:
        s = self.settings
        if self.neuron_sets is None:
            sets = []
            with self.reporter.task("locating the relation's neurons", total=len(requests)) as task:
                for fact in requests:
                    with self.timer("locate"):
                        sets.append(set(self._locator(km, fact.prompts, fact.old, s).neurons))
                    task.advance()
        else:
            sets = self.neuron_sets
            if len(sets) != len(requests):
                raise EditError(f"{len(sets)} neuron sets for {len(requests)} facts")
        neurons = shared_by(sets, s.relation_share)
        if not neurons:
            raise EditError(f"no neuron is shared by {s.relation_share:.0%} of the {len(requests)} facts: nothing to erase")
        neurons = checked(km, neurons)
        details = KnDetails(rule=f"erase-relation-{s.mode}", embedding=_embedding_kind(km), settings=_settings_dict(s),
                            requests=[], neurons=neurons, relation_counts=[sum(n in x for x in sets) for n in neurons])
        return value_changes(km, neurons, erase_values(km, len(neurons), s.mode), additive=False), details


def erase_relation(km: KnModel, facts: Sequence[EditRequest], share: float = 0.1, mode: str = "zero",
                   neuron_sets: Sequence[Iterable[Neuron]] | None = None, *, locator: Locator | None = None,
                   settings: LocateSettings | None = None, reporter: Reporter | None = None) -> Edit:
    """Erase a relation (:class:`KnowledgeNeuronRelationEraser`). facts: one EditRequest (prompts, old =
    object) per fact; neuron_sets: their neurons, if known; settings: how to locate them otherwise."""
    facts = list(facts)
    if not facts:
        raise EditError("erase_relation needs the relation's facts")
    base = settings or LocateSettings()
    config = RelationEraseSettings(steps=base.steps, threshold=base.threshold, share=base.share, layers=base.layers,
                                   mode=mode, relation_share=share)
    editor = KnowledgeNeuronRelationEraser(config.check(), neuron_sets=neuron_sets, locator=locator, reporter=reporter)
    return editor.apply(km, facts)
