"""Subject knowledge neurons (``kn-subject``): edit a fact through the knowledge neurons of one layer located at
the subject's last token, so that the change follows this subject's key rather than the answer slot that every
subject of the relation shares.

Why: at the answer position the located neurons fire almost the same for every subject of a relation (cosine
0.97-0.998 between two subjects with the same object on smollm2-135m), so any value-vector change there moves
the neighbours' answers as much as the edited one. At the subject's last token, in early and middle layers,
two subjects' FFN activations are nearly orthogonal (cosine 0.07 at layer 3, 0.10 at 5, 0.21 at 8).

Per request, on layer l (ROME's layer for the model unless set):

1. Locate: integrated gradients of P(old | prompt) with respect to layer l's FFN activations at the subject's
   last token (kn_edit.locating.attribution, ``positions=``), averaged over the edit prompts; S = the ``neurons``
   strongest (null: every neuron of the layer).
2. Key and value: k* = the FFN activation at the subject's last token after context prefixes, and the residual
   δ = v* − W k* that makes new the answer (the key-value pieces: kn_edit.editing.keyvalue.keys / target).
3. Least change of S's value vectors V_S [d_model, |S|] (the paper's knowledge-neuron edit, solved):

       minimise  tr(D C_SS Dᵀ)   subject to   D k*_S = δ   and   D k_j,S = 0 for each preserved key k_j

   (with ``fit=prompts``, the default as in ROME, also D k_i,S = δ for each edit prompt's own key k_i: see
   kn_edit/editing/rome/update.py for why)

   with C_SS the neurons' co-activation on Wikipedia text (ROME's cached key statistics restricted to S): the
   edited layer's output moves by exactly δ on this subject's key, by nothing on the preserved subjects' keys,
   and as little as possible on general text. With A = [k*_S, k_1,S, ...] and R = [δ, 0, ...]:
   D = R (Aᵀ C_SS⁻¹ A)⁻¹ Aᵀ C_SS⁻¹. Without preserved keys D = δ (C_SS⁻¹k*_S)ᵀ / (k*_Sᵀ C_SS⁻¹ k*_S); with S = the
   whole layer that is ROME's rank-one update.

   Edits already made (``keep_edits`` w > 0): the keys k*_e of the model's active edits of this layer (kn-subject,
   ROME, MEMIT: kn_edit.editing.nullspace.edited_keys) and of this call's earlier requests join the metric,
   C_SS + w Σ_e k*_e,S k*_e,Sᵀ, so the solve moves the layer's output on them as little as it can while still
   meeting the constraints: a later edit that shares neurons with an earlier one does not undo it (AlphaEdit's
   preserved edit keys, as a soft term, since after tens of edits there are more of them than neurons). C is a
   mean over general-text tokens, so w = 1 weighs each earlier key like the whole text sample in its direction.
   Off by default: over 50 sequential edits on smollm2-135m, w = 1 held as many edits (88 % against 90 %) but
   kept fewer never-edited facts (57 / 51 % against 69 / 66 %) and raised text perplexity more (+31 % against
   +12 %): with tens of earlier keys in the metric, general text's share of it shrinks
   (evaluations/results/sequential100_smollm2/).
4. Widening (``widen_above``): the change is measured on the guard's text sample; where it moves that text's
   perplexity by more than ``widen_above``, the same solve is made over ``widen_factor`` times as many neurons
   (the next strongest), and so on up to the whole layer (where it is ROME's update), keeping the first count
   within ``widen_above`` (none: the one that moved the text least). A few neurons must carry the whole δ with
   large changes to their value vectors, and on some facts and models that costs general text: on gemma3-270m,
   64 of 2,048 neurons moved the guard's sample by +15 to +31 % on 3 of 10 facts, the whole layer by under 5 %
   (evaluations/README.md). Widening costs one small forward pass per count tried, no new optimisation.
5. The text-damage guard (kn_edit.editing.guard) refuses the edit beyond ``max_text_change``.

Several requests (``batch``): ``joint`` (the default) finds every request's neurons, keys and δ on the model as it
is, then makes one least-change solve over the union S of their neurons with every request's constraints
(D k*_i,S = δ_i for each request i, with its edit prompts' own keys under fit=prompts, and the preserved keys):
the layer's output on each request's keys moves by exactly its δ, whatever the other requests ask. Keys at the
edited layer depend only on the layers below it, so each request's δ, found alone, is still the one it needs.
Requests of one subject (its facts of several relations) share that subject's key, so they get one δ, optimised
over all their rewrite rows at once (each row with its own new object), instead of one δ each that the key
could not carry together.
``preserve_nearest`` (off by default): the names (``cov_subject_names``) whose keys an update for each request's
key would move most (kn_edit.editing.keyvalue.nearest) join the preserved keys, each as k* is taken (with the
prefixes), in each edit prompt in place of the subject and alone at a text's start, the places the edit's fitted
keys reach; the report lists them (``held_names``).
``nearest_kl`` (off by default): the edit prompts about the names an update for the subject's key would reach
most (the largest shares of δ among ``cov_subject_names``) join v*'s objective, with the KL of their answers
against the unedited model's and the update's share of δ added at each of their tokens
(kn_edit.editing.keyvalue.neighbours), so δ is chosen to leave them their answers; the report lists them
(``kl_names``).
``sequential``: one request after another, each located and solved on top of the earlier ones (trial changes,
reverted), the earlier requests' keys weighed by ``keep_edits``.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from enum import Enum
from typing import TYPE_CHECKING, ClassVar, Optional, Sequence

import torch

from ..locating.attribution import attribute_steps
from ..errors import ConfigError, EditError
from ..models.neurons import Neuron
from ..progress import NullReporter, Reporter
from .base import Editor, EditRequest
from .guard import guard_edit, guard_sample, text_change
from .ledger import commit
from .nullspace import edited_keys
from .keyvalue.solve import least_change
from .keyvalue.nearest import held_keys, nearest_subjects, overlaps
from .keyvalue.neighbours import NeighbourRows, nearest_answer_rows
from .keyvalue.statistics import statistics_for, subjects_for
from .keyvalue.keys import check_causal_requests, context_prefixes, fitted_keys, keys_at, prompt_text, subject_end, subject_texts, token_at
from .keyvalue.settings import KeyFit, KeyText
from .rome.settings import RomeSettings
from .keyvalue.target import kl_row, optimise_value, rewrite_rows
from .settings import BatchSolve, as_choice, check_text_limit, with_overrides
from .values import value_changes

if TYPE_CHECKING:
    from ..models.model import KnModel


# The least-change solve's advice when it is singular here: its C is the edited neurons' block of the statistics.
EDIT_MORE_NEURONS = "edit more neurons, preserve fewer subjects, or set cov_ridge > 0"


@dataclass
class SubjectSettings(RomeSettings):
    """kn-subject: ROME's key, value and statistics settings, plus the neurons edited and the text guard."""

    measured_as: ClassVar[str] = "kn-subject"

    neurons: Optional[int] = 64  # edit this many of the layer's neurons (strongest attribution); null: all (ROME)
    attribution_steps: int = 5  # integrated-gradients steps m for locating them at the subject's last token
    max_text_change: Optional[float] = 0.05  # refuse beyond this perplexity change on the guard's sample; null: report only
    keep_edits: float = 0.0  # weight w of earlier edits' keys in the least-change metric (0: ignore them)
    batch: BatchSolve = BatchSolve.joint  # several requests: one solve (joint) | each on top of the earlier ones
    widen_above: Optional[float] = 0.01  # guard-sample text change beyond which more neurons are edited; null: never
    widen_factor: int = 4  # each wider attempt edits this many times as many neurons (up to the whole layer)
    # hold still the keys of this many names (of cov_subject_names) that an update for the subject's key would
    # move most (kn_edit.editing.keyvalue.nearest): preserved keys found, not given, held with the prefixes, in the
    # edit prompts and at a text's start. 0: none (the default: on gemma3-270m's 40 Known 1000 facts, 8 kept no
    # more same-object neighbours, 73.3 %, and moved text more, +1.38 %; evaluations/README.md)
    preserve_nearest: int = 0
    # keep the answers of the edit prompts about this many names (of cov_subject_names) that the update would
    # reach most, in v*'s objective with the update's reach simulated (kn_edit.editing.keyvalue.neighbours), weighed
    # by nearest_kl_factor. 0: none (the default: on gemma3-270m's 40 Known 1000 facts, 8 names kept 83.3 % of
    # same-object neighbours against 76.7 %, 90.0 % of other-object ones against 92.0 %, and took 2.5× the time)
    nearest_kl: int = 0
    nearest_kl_factor: float = 1.0

    def check(self) -> "SubjectSettings":
        super().check()
        if self.neurons is not None and (isinstance(self.neurons, bool) or self.neurons < 1):
            raise ConfigError(f"neurons must be >= 1 (or null for the whole layer), got {self.neurons}")
        for key in ("preserve_nearest", "nearest_kl"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ConfigError(f"{key} must be a whole number >= 0, got {value!r}")
        factor = self.nearest_kl_factor
        if isinstance(factor, bool) or not isinstance(factor, (int, float)) or not (math.isfinite(factor) and factor >= 0):
            raise ConfigError(f"nearest_kl_factor must be a finite number >= 0, got {factor!r}")
        if isinstance(self.attribution_steps, bool) or self.attribution_steps < 1:
            raise ConfigError(f"attribution_steps must be >= 1, got {self.attribution_steps}")
        check_text_limit(self.max_text_change)
        check_text_limit(self.widen_above, "widen_above")
        if isinstance(self.widen_factor, bool) or not isinstance(self.widen_factor, int) or self.widen_factor < 2:
            raise ConfigError(f"widen_factor must be a whole number >= 2, got {self.widen_factor!r}")
        if isinstance(self.keep_edits, bool) or not isinstance(self.keep_edits, (int, float)) or not (
                math.isfinite(self.keep_edits) and self.keep_edits >= 0):
            raise ConfigError(f"keep_edits must be a finite number >= 0, got {self.keep_edits!r}")
        self.batch = as_choice(BatchSolve, self.batch, "batch")
        if self.null_space:
            raise ConfigError("null_space is not available for kn-subject (its solve already holds general text's "
                              "co-activation and the preserved subjects' keys); use rome or memit with null_space")
        return self




def neuron_counts(first: int | None, d_ff: int, factor: int, widen: bool) -> list[int]:
    """The neuron counts an edit may take, narrowest first: ``first`` (None: the whole layer), then, widening,
    ``factor`` times as many each time up to the whole layer (64, 256, 1024, 1536 for d_ff = 1536)."""
    counts = [d_ff if first is None else min(first, d_ff)]
    while widen and counts[-1] < d_ff:
        counts.append(min(counts[-1] * factor, d_ff))
    return counts


def strongest(scores: torch.Tensor, n: int) -> torch.Tensor:
    """Indices of the ``n`` highest ``scores`` (strongest first); the whole layer in its own order."""
    return torch.arange(len(scores)) if n >= len(scores) else scores.argsort(descending=True)[:n]


def subject_positions(km: KnModel, prompt: str, subject: str, target: str):
    """(answer steps of ``target`` after ``prompt``, the subject's last token's position in each)."""
    text = prompt_text(prompt)
    ids, pos = token_at(km.tokenizer, text, subject_end(text, subject))
    steps = km.encode(text, target).steps
    for s in steps:
        if s.input_ids[: len(ids)].tolist() != ids:
            raise EditError(f"prompt {text!r} tokenizes differently with {target!r} after it")  # pragma: no cover
    return list(steps), [pos] * len(steps)


def subject_scores(km: KnModel, prompts: Sequence[str], subject: str, target: str, layer: int, steps: int) -> torch.Tensor:
    """[d_ff]: integrated-gradients scores of layer's neurons at the subject's last token for ``target``,
    averaged over each prompt's answer tokens, then over the prompts."""
    per_prompt = []
    for prompt in prompts:
        answer_steps, positions = subject_positions(km, prompt, subject, target)
        scores = attribute_steps(km, answer_steps, steps, [layer], positions=positions)  # [n_tokens, 1, d_ff]
        per_prompt.append(scores[:, 0].mean(dim=0))
    return torch.stack(per_prompt).mean(dim=0)


@dataclass
class SubjectRequestDetails:
    subject: str
    old: str
    new: str
    neurons: list[int] = field(metadata={"show": False})  # indices in the layer, strongest attribution first
    scores: list[float] = field(metadata={"show": False})  # their attribution at the subject's last token
    key_norm: float = 0.0  # ‖k*‖ (whole layer)
    delta_norm: float = 0.0  # ‖δ‖ = ‖v* − W k*‖
    clamped: bool = False
    nll_first: float = 0.0  # mean NLL of new over the rewrite rows, before and after optimising δ
    nll_last: float = 0.0
    change_norm: float = 0.0  # ‖D‖ (Frobenius)
    relative_change: float = 0.0  # ‖D‖ / ‖V_S‖
    preserved: int = 0  # preserved subjects' keys held in the solve
    count: int = 0  # neurons asked for per request: ``neurons``, or the count widening kept
    # (neurons, guard-sample text change) of each count tried, narrowest first (widen_above; empty: not measured)
    widening: list[tuple[int, float]] = field(default_factory=list)
    kept_edits: int = 0  # earlier edits' keys weighed in the metric (keep_edits)
    kl_names: list[str] = field(default_factory=list)  # the names whose answers nearest_kl kept in v*'s objective
    key: torch.Tensor = field(default=None, repr=False, metadata={"show": False})  # k* [d_ff]
    delta: torch.Tensor = field(default=None, repr=False, metadata={"show": False})  # δ [d_model]


@dataclass
class SubjectDetails:
    layer: int
    prefixes: list[str]
    covariance_tokens: int
    covariance_from_cache: bool
    text_change: float | None
    requests: list[SubjectRequestDetails]
    settings: dict
    neurons: list[Neuron] = field(default_factory=list, metadata={"show": False})
    layer_source: str = ""  # where the layer comes from: setting, measured (its file), table or rule
    held_names: list[str] = field(default_factory=list)  # the names preserve_nearest held still


class SubjectNeuronEditor(Editor):
    """kn-subject (see the module docstring). Extras: ``preserve_subjects`` (subjects whose keys the solve
    keeps mapped as before, e.g. other subjects of the relation), ``key_texts`` (text for the key statistics
    instead of ``cov_corpus``), ``guard_texts`` (the guard's sample instead of the Wikipedia one)."""

    name = "kn-subject"
    config_class = SubjectSettings
    can_update = True
    can_erase = False

    def __init__(self, settings: SubjectSettings | None = None, *, preserve_subjects: Sequence[str] = (),
                 key_texts: Sequence[str] | None = None, guard_texts: Sequence[str] | None = None,
                 reporter: Reporter | None = None, **overrides) -> None:
        self.settings = with_overrides(settings or SubjectSettings(), overrides)
        self.preserve_subjects = [str(x) for x in preserve_subjects]
        if any(not x.strip() for x in self.preserve_subjects):
            raise EditError("preserve_subjects holds an empty subject")
        self.key_texts = list(key_texts) if key_texts is not None else None
        self.guard_texts = tuple(guard_texts) if guard_texts is not None else None
        self.reporter = reporter or NullReporter()

    def compute(self, km: KnModel, requests: list[EditRequest]) -> tuple[list, SubjectDetails]:
        s = self.settings
        check_causal_requests(km, requests, "kn-subject", "its neurons are located at the subject's last token")
        choice = s.choice_for(km)
        layer = choice.layers[0]
        with self.timer("statistics"):
            stats = statistics_for(km, layer, s, self.key_texts, self.reporter)
        with self.timer("prefixes"):
            prefixes = context_prefixes(km, s.n_prefixes, s.prefix_length, s.prefix_top_k, s.prefix_seed)
        whole = s.key_text == KeyText.subject
        preserved = (torch.stack([keys_at(km, layer, subject_texts(km, x, [], prefixes, True)).mean(dim=0)
                                  for x in self.preserve_subjects]) if self.preserve_subjects
                     else torch.zeros(0, km.d_ff))  # [p, d_ff]
        held_names: list[str] = []
        if s.preserve_nearest:
            with self.timer("keys"):
                held_names, nearest = self._nearest(km, layer, stats, prefixes, requests)
            preserved = torch.cat([preserved, nearest])
        # keys of the model's active edits of this layer (read once: the call's own trials carry no report)
        active = edited_keys(km, layer) if s.keep_edits else None
        if s.batch == BatchSolve.joint and len(requests) > 1:
            neurons, rows, done = self._joint(km, layer, stats.mom2, prefixes, whole, preserved, requests, active)
        else:
            neurons, rows, done = self._sequential(km, layer, stats.mom2, prefixes, whole, preserved, requests, active)
        changes = value_changes(km, neurons, torch.cat(rows), additive=True)
        what = ", ".join(f"{r.subject!r}: {r.old!r} → {r.new!r}" for r in requests)
        # widening measured the change it kept on the guard's sample: the whole edit's, unless several requests
        # were solved one after another (each measured on top of the earlier ones)
        whole_edit = len(requests) == 1 or s.batch == BatchSolve.joint
        measured = dict(done[0].widening).get(done[0].count) if whole_edit else None
        with self.timer("guard"):
            guard = guard_edit(km, changes, s.max_text_change, what, self.guard_texts, measured=measured)
        details = SubjectDetails(layer=layer, prefixes=prefixes, covariance_tokens=stats.n_tokens,
                                 covariance_from_cache=stats.from_cache, text_change=guard.change, requests=done,
                                 settings={k: (v.value if isinstance(v, Enum) else v) for k, v in vars(s).items()},
                                 neurons=list(dict.fromkeys(neurons)), layer_source=choice.describe(),
                                 held_names=held_names)
        return changes, details

    def _nearest(self, km: KnModel, layer: int, stats, prefixes: list[str],
                 requests: Sequence[EditRequest]) -> tuple[list[str], torch.Tensor]:
        """(names, keys [n, d_ff]) that ``preserve_nearest`` holds still: each request subject's nearest names
        (kn_edit.editing.keyvalue.nearest), once each, none that is or holds any request's subject."""
        s = self.settings
        found = subjects_for(km, layer, s, self.reporter)
        subjects = list(dict.fromkeys(r.subject.strip() for r in requests))
        names, keys = [], []
        for request in requests:
            near = nearest_subjects(km, layer, request.subject, prefixes, found, stats.mom2, s.preserve_nearest,
                                    s.cov_ridge, stats.memo)
            new = [(n, k) for n, k in zip(near.names, near.keys)
                   if n not in names and not any(overlaps(n, x) for x in subjects)]
            if not new:
                continue
            names += [n for n, _ in new]
            keys.append(torch.stack([k for _, k in new]))  # with the prefixes, as k* is taken
            if s.fit != KeyFit.mean or s.fit_subject_start:  # where the edit's other keys would move them
                keys.append(held_keys(km, layer, [n for n, _ in new], request.subject,
                                      request.prompts if s.fit != KeyFit.mean else [], s.fit_subject_start))
        return names, torch.cat(keys) if keys else torch.zeros(0, km.d_ff)

    def _sequential(self, km: KnModel, layer: int, mom2: torch.Tensor, prefixes: list[str], whole: bool,
                    preserved: torch.Tensor, requests: list[EditRequest], active: torch.Tensor | None,
                    ) -> tuple[list[Neuron], list[torch.Tensor], list[SubjectRequestDetails]]:
        """Each request located and solved on the model with the earlier ones' changes applied (as trials)."""
        neurons: list[Neuron] = []
        rows: list[torch.Tensor] = []
        done: list[SubjectRequestDetails] = []
        trials = []
        try:
            with self.reporter.task("kn-subject edits", total=len(requests)) as task:
                for request in requests:
                    earlier = self._earlier_keys(active, done)
                    (found,), index, d, tried = self._solve(km, layer, mom2, self._prepare(
                        km, layer, prefixes, whole, [request], mom2, preserved, earlier), preserved, earlier)
                    done.append(self._details(km, layer, request, found, d, len(preserved), earlier, tried))
                    neurons += [Neuron(layer, int(i)) for i in index]
                    rows.append(d.t().float())
                    if len(done) < len(requests):  # the next request is solved on top of this one
                        trials.append(commit(km, "trial", [], value_changes(km, neurons[-len(index):], rows[-1], True)))
                    task.advance()
        finally:
            for trial in reversed(trials):
                trial.revert()
        return neurons, rows, done

    def _joint(self, km: KnModel, layer: int, mom2: torch.Tensor, prefixes: list[str], whole: bool, preserved: torch.Tensor,
               requests: list[EditRequest], active: torch.Tensor | None,
               ) -> tuple[list[Neuron], list[torch.Tensor], list[SubjectRequestDetails]]:
        """Every request prepared on the model as it is (one subject's requests together: one δ for them all),
        then one solve over the union of their neurons."""
        by_subject: dict[str, list[EditRequest]] = {}
        for request in requests:
            by_subject.setdefault(request.subject.strip(), []).append(request)
        prepared: dict[int, _Prepared] = {}
        with self.reporter.task("kn-subject: keys and targets", total=len(requests)) as task:
            for group in by_subject.values():
                for request, found in zip(group, self._prepare(km, layer, prefixes, whole, group, mom2, preserved, active)):
                    prepared[id(request)] = found
                task.advance(len(group))
        try:
            found, index, d, tried = self._solve(km, layer, mom2, [prepared[id(r)] for r in requests], preserved,
                                                 active)
        except EditError as exc:
            raise EditError(f"{exc} (or set batch=sequential)") from exc
        done = [self._details(km, layer, r, f, d, len(preserved), active, tried) for r, f in zip(requests, found)]
        return [Neuron(layer, int(i)) for i in index], [d.t().float()], done

    def _solve(self, km: KnModel, layer: int, mom2: torch.Tensor, found: list["_Prepared"], preserved: torch.Tensor,
               earlier: torch.Tensor | None,
               ) -> tuple[list["_Prepared"], torch.Tensor, torch.Tensor, list[tuple[int, float]]]:
        """One least-change solve over the union S of ``found``'s neurons, every request's keys moved by its δ
        and the preserved keys by nothing: (``found`` with the neurons it took, S, D [d_model, |S|], the counts
        tried with their guard-sample text change). Widening: at the narrowest neuron count whose change of
        the guard's sample stays within ``widen_above``; if none does, the count that changed it least."""
        s = self.settings
        counts = neuron_counts(s.neurons, km.d_ff, s.widen_factor, s.widen_above is not None)
        tried: list[tuple[int, float]] = []
        best = None
        for n in counts:
            at = [dataclasses.replace(f, index=strongest(f.scores, n)) for f in found]
            index = torch.tensor(list(dict.fromkeys(int(i) for f in at for i in f.index)), dtype=torch.long)
            with self.timer("solve"):
                d = self._least_change(mom2, index, torch.cat([f.moved for f in at]), torch.cat([f.targets for f in at]),
                                       preserved, earlier)
            if len(counts) == 1:
                return at, index, d, tried
            with self.timer("widen"):  # the guard's measure of each count tried
                change = text_change(km, value_changes(km, [Neuron(layer, int(i)) for i in index], d.t().float(), True),
                                     guard_sample(self.guard_texts))
            tried.append((n, change))
            if best is None or change < best[-1]:  # NaN (a wrecked model) is never the best
                best = (at, index, d, change)
            if change <= s.widen_above:
                break
        if best is None:  # every count wrecked the sample (NaN): the widest, for the guard to refuse
            best = (at, index, d, tried[-1][1])
        return best[0], best[1], best[2], tried

    def _least_change(self, mom2: torch.Tensor, index: torch.Tensor, moved: torch.Tensor, targets: torch.Tensor,
                      preserved: torch.Tensor, earlier: torch.Tensor | None, check_exact: bool = True) -> torch.Tensor:
        """D [targets' width, |S|]: the least change of neurons S = ``index`` (C's block for them, earlier edits'
        keys weighed in) that moves the ``moved`` keys [m, d_ff] by ``targets`` [m, ·] and the preserved keys by
        nothing: the edit's solve, and with unit targets the direction nearest_kl simulates."""
        keys = torch.cat([moved, preserved])[:, index]
        targets = torch.cat([targets, targets.new_zeros(len(preserved), targets.shape[1])])
        return least_change(mom2[index][:, index], keys, targets, self.settings.cov_ridge, self._penalty(index, earlier),
                            check_exact=check_exact, hint=EDIT_MORE_NEURONS)

    def _penalty(self, index: torch.Tensor, earlier: torch.Tensor | None) -> torch.Tensor | None:
        """keep_edits · Σ k_e,S k_e,Sᵀ [|S|, |S|] float64 over the earlier edits' keys, or None without any."""
        if earlier is None or not len(earlier):
            return None
        held = earlier[:, index].to(torch.float64)  # [e, |S|]
        return self.settings.keep_edits * held.T @ held

    def _earlier_keys(self, active: torch.Tensor | None, done: list[SubjectRequestDetails]) -> torch.Tensor | None:
        """[e, d_ff] float64: k* of the model's active edits of the layer (``active``) and of this call's requests
        so far (their trial changes are in the ledger but carry no report, so ``edited_keys`` does not see them),
        or None with keep_edits = 0 or none made."""
        if not self.settings.keep_edits:
            return None
        found = [k for k in (active,) if k is not None] + [r.key.to(torch.float64)[None] for r in done]
        return torch.cat(found) if found else None

    def _prepare(self, km: KnModel, layer: int, prefixes: list[str], whole: bool, requests: Sequence[EditRequest],
                 mom2: torch.Tensor, preserved: torch.Tensor, earlier: torch.Tensor | None) -> list["_Prepared"]:
        """Each request's neurons, key k* and the keys the solve moves, on the model as it is now, and one δ for
        them all: ``requests`` are one subject's (one request, or all of a joint batch's requests of that
        subject). Their keys at the subject are one (the key depends only on the text up to the subject), so
        they can carry only one δ; it is optimised over all their rewrite rows, each row with its own request's
        new object, with the clamp scaled by the layer's output at their mean key. ``preserved`` and ``earlier``
        (the solve's held keys and earlier edits' keys) shape the update nearest_kl simulates."""
        s = self.settings
        proj = km.value_proj(layer)
        located, keys, moved = [], [], []
        first = neuron_counts(s.neurons, km.d_ff, s.widen_factor, widen=False)[0]
        for request in requests:
            if first >= km.d_ff:  # the whole layer: nothing to choose, nothing to widen to
                scores = torch.zeros(km.d_ff)
            else:
                with self.timer("locate"):
                    scores = subject_scores(km, request.prompts, request.subject, request.old, layer, s.attribution_steps)
            located.append((scores, strongest(scores, first)))
            with self.timer("keys"):
                keys.append(keys_at(km, layer, subject_texts(km, request.subject, request.prompts, prefixes, whole)).mean(dim=0))
                moved.append(fitted_keys(km, layer, keys[-1], request.subject, request.prompts, prefixes, s.fit,
                                         s.fit_subject_start, mom2))  # [m, d_ff]
        mean_key = keys[0] if len(keys) == 1 else torch.stack(keys).mean(dim=0)
        names, near = [], None
        if s.nearest_kl:
            with self.timer("keys"):
                names, near = self._nearest_answers(km, layer, mom2, requests, located[0][1], moved[0], preserved,
                                                    earlier)
        with torch.no_grad():
            output = proj(mean_key.to(km.device, proj.weight.dtype)[None])[0].float().cpu()  # W k* (+ bias) [d_model]
        rows = [row for r in requests for row in rewrite_rows(km, r.prompts, r.subject, r.new, prefixes)]
        with self.timer("optimise"):
            found = optimise_value(km, layer, rows, kl_row(km, requests[0].subject), float(output.norm()), lr=s.lr,
                                   steps=s.steps, stop_loss=s.stop_loss, kl_factor=s.kl_factor,
                                   weight_decay=s.weight_decay, clamp_norm_factor=s.clamp_norm_factor,
                                   reporter=self.reporter, neighbours=near, neighbour_factor=s.nearest_kl_factor)
        return [_Prepared(scores, index, key, found, m, found.delta[None].expand(len(m), -1), names)
                for (scores, index), key, m in zip(located, keys, moved)]

    def _nearest_answers(self, km: KnModel, layer: int, mom2: torch.Tensor, requests: Sequence[EditRequest],
                         index: torch.Tensor, moved: torch.Tensor, preserved: torch.Tensor, earlier: torch.Tensor | None,
                         ) -> tuple[list[str], NeighbourRows | None]:
        """nearest_kl's names and rows (kn_edit.editing.keyvalue.neighbours) for one subject's ``requests``: the
        update simulated is the solve's for the first request alone (its fitted keys ``moved`` given δ, the
        preserved keys none, earlier edits' keys weighed in) on its first neurons ``index``, w [d_ff] zero
        elsewhere: exact unless widening takes more neurons, or a joint batch adds other subjects' constraints."""
        s = self.settings
        direction = torch.zeros(km.d_ff, dtype=torch.float64)
        direction[index] = self._least_change(mom2, index, moved, torch.ones(len(moved), 1), preserved, earlier,
                                              check_exact=False)[0]
        found = subjects_for(km, layer, s, self.reporter)
        prompts = list(dict.fromkeys(p for r in requests for p in r.prompts))
        return nearest_answer_rows(km, layer, found, direction, requests[0].subject, prompts, s.nearest_kl)

    def _details(self, km: KnModel, layer: int, request: EditRequest, found: "_Prepared", d: torch.Tensor, preserved: int,
                 earlier: torch.Tensor | None, tried: list[tuple[int, float]]) -> SubjectRequestDetails:
        """The request's details; ``d`` [d_model, n] is the change of the solve it took part in (joint: shared)."""
        values = km.value_vectors(layer)[found.index].detach().float().cpu()  # [|S|, d_model]
        return SubjectRequestDetails(
            subject=request.subject, old=request.old, new=request.new, neurons=found.index.tolist(),
            scores=found.scores[found.index].tolist(), key_norm=float(found.key.norm()),
            delta_norm=float(found.value.delta.norm()), clamped=found.value.clamped, nll_first=found.value.nll[0],
            nll_last=found.value.nll[-1], change_norm=float(d.norm()),
            relative_change=float(d.norm()) / max(float(values.norm()), 1e-12), preserved=preserved,
            kept_edits=0 if earlier is None else len(earlier), count=len(found.index), widening=list(tried), key=found.key,
            delta=found.value.delta, kl_names=list(found.kl_names),
        )


@dataclass
class _Prepared:
    """One request's pieces for the solve: attribution scores [d_ff], neurons S (indices), k* [d_ff], the v*
    optimisation's result, the keys moved by δ [m, d_ff] and their targets [m, d_model], and the names whose
    answers nearest_kl kept."""

    scores: torch.Tensor
    index: torch.Tensor
    key: torch.Tensor
    value: object
    moved: torch.Tensor
    targets: torch.Tensor
    kl_names: list[str] = field(default_factory=list)
