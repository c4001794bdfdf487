"""The MEMIT editor (Meng et al. 2023, "Mass-Editing Memory in a Transformer"), implemented from the paper.

For a batch of requests, over critical layers R = l_1 < ... < L:

1. per request i, a target residual z_i = h_i^L + δ_i at the subject's last token after layer L: δ_i is
   optimised like ROME's v* (kn_edit.editing.keyvalue.target.optimise_value: added to layer L's FFN output, which
   adds it to the residual stream), and h_i^L is the residual after layer L averaged over the rewrite rows (every
   edit prompt after every context prefix);
2. for each l in R in order, on the model with the earlier layers' updates applied: the keys K_l (each request's
   value-projection input at the subject's last token, averaged over context prefixes as ROME's k*), the residual
   still missing z_i − h_i^L spread over the layers left, R_l = (z_i − h_i^L) / (L − l + 1), and the update
   ΔW_l = R_l K_lᵀ (λ C_l + K_l K_lᵀ)⁻¹ (kn_edit.editing.memit.solve), or with ``null_space`` AlphaEdit's
   projected update (kn_edit.editing.nullspace);
3. (not in the paper; ``refit`` and ``retarget``) requests the solve leaves short (the new object not top-1 on
   every edit prompt with the edit applied) are solved again with their prompts' own keys, and, where still short,
   their δ_i is optimised again on the edited model (z_i' = h_i^L there + δ_i'), and every layer is solved again
   from the targets: in one edit of many facts the others' updates also move a request's prompt at tokens other
   than its subject's, which its first z_i, optimised on the unedited model, did not see.

One edit: one whole-parameter change per layer of R. The key statistics C_l are the unedited model's: read (or
computed and cached on disk, shared with ROME) the first time the editor edits a model, and kept for that model
by the editor, so later edits in a sequence (which change the layers below l, and so the cache's digest) do not
recompute them; C describes the knowledge to preserve, which is the unedited model's.

Gemma 3 scales the FFN output with a norm before the residual, so there δ added to the FFN output is not the
residual's change; MEMIT is exact for the pre-norm families (GPT-2, LLaMA, Mistral, Qwen2, GPT-NeoX, GPT-J).
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field
from enum import Enum
from typing import TYPE_CHECKING, Sequence

import torch

from ...progress import NullReporter, Reporter
from ..base import Editor, EditRequest
from ..ledger import commit
from ..nullspace import null_space_delta
from ..keyvalue.statistics import KeyStatistics, statistics_for
from ..keyvalue.keys import check_causal_requests, context_prefixes, fitted_keys, keys_at, prompt_text, subject_texts
from ..keyvalue.settings import KeyFit, KeyText
from ..rome.update import weight_change
from ..keyvalue.target import kl_row, optimise_value, rewrite_rows
from ..settings import with_overrides
from ..values import value_location, whole_change
from .hidden import hidden_at_subject
from .settings import MemitSettings
from .solve import memit_delta

if TYPE_CHECKING:
    from ...models.model import KnModel


@dataclass
class MemitRequestDetails:
    """The target of one request: δ = z − h^L [d_model] (at the last critical layer, before the edit)."""

    subject: str
    old: str
    new: str
    target_norm: float  # ‖δ‖
    output_norm: float  # ‖W_L k‖ of the last critical layer, the scale of the norm terms
    clamped: bool
    steps: int
    stopped_early: bool
    nll_first: float
    nll_last: float
    kl_last: float
    remaining: float  # ‖z − h^L‖ / ‖δ‖ after the edit (0: the target is reached exactly)
    fit: str  # the keys its update was solved for (``fit``, or ``refit`` when the first solve left it short)
    delta: torch.Tensor = field(repr=False)
    hidden: torch.Tensor = field(repr=False)  # h^L before the edit [d_model]
    retargeted: int = 0  # rounds in which its δ was optimised again on the edited model (``retarget``)


@dataclass
class MemitLayerDetails:
    """One critical layer's update: keys K_l [m, d_ff] and residuals R_l [m, d_model] it was solved for (m = the
    number of requests with ``fit=mean``; more with ``fit`` prompts / rows)."""

    layer: int
    parameter: str
    update_norm: float  # ‖ΔW_l‖
    relative_update: float  # ‖ΔW_l‖ / ‖W_l‖
    covariance_tokens: int
    covariance_from_cache: bool
    null_space_dims: int | None  # with null_space: the dimension of the projector's range
    keys: torch.Tensor = field(repr=False)
    residuals: torch.Tensor = field(repr=False)


@dataclass
class MemitDetails:
    """MEMIT's details (``EditReport.details``)."""

    layers: list[int]
    key_text: str
    prefixes: list[str]
    null_space: bool
    relative_update: float  # ‖[ΔW_l]‖ / ‖[W_l]‖ over the layers
    requests: list[MemitRequestDetails]
    updates: list[MemitLayerDetails]
    refitted: list[int]  # indices of the requests solved again with ``refit`` (the first solve left them short)
    settings: dict
    layer_source: str = ""  # where the layers come from: setting, measured (its file), table or rule

    def keys_by_layer(self) -> dict[int, torch.Tensor]:
        """{layer: keys [n, d_ff]} this edit wrote (read by the null-space option of later edits)."""
        return {u.layer: u.keys for u in self.updates}


def _distinct(keys: torch.Tensor, rtol: float = 1e-6) -> torch.Tensor:
    """The rows of ``keys`` [m, d] without those equal (within ``rtol`` of their norm) to an earlier row."""
    kept: list[torch.Tensor] = []
    for row in keys:
        if all(float((row - k).norm()) > rtol * max(float(k.norm()), 1e-30) for k in kept):
            kept.append(row)
    return torch.stack(kept)


def _settings_dict(settings: MemitSettings) -> dict:
    return {k: (v.value if isinstance(v, Enum) else v) for k, v in vars(settings).items()}


class MemitEditor(Editor):
    """MEMIT. ``key_texts``: the text the key statistics are taken over, instead of ``cov_corpus``."""

    name = "memit"
    config_class = MemitSettings
    can_update = True
    can_erase = False

    def __init__(self, settings: MemitSettings | None = None, *, key_texts: Sequence[str] | None = None,
                 reporter: Reporter | None = None, **overrides) -> None:
        self.settings = with_overrides(settings or MemitSettings(), overrides)
        self.key_texts = list(key_texts) if key_texts is not None else None
        self.reporter = reporter or NullReporter()
        # per model: {layer: statistics of the unedited model} (see the module docstring)
        self._statistics: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

    def statistics(self, km: KnModel, layer: int) -> KeyStatistics:
        held = self._statistics.setdefault(km.model, {})
        if layer not in held:
            held[layer] = statistics_for(km, layer, self.settings, self.key_texts, self.reporter)
        return held[layer]

    def compute(self, km: KnModel, requests: list[EditRequest]) -> tuple[list, MemitDetails]:
        s = self.settings
        check_causal_requests(km, requests, "MEMIT")
        choice = s.choice_for(km)
        layers = list(choice.layers)
        with self.timer("statistics"):
            stats = {layer: self.statistics(km, layer) for layer in layers}
        with self.timer("prefixes"):
            prefixes = context_prefixes(km, s.n_prefixes, s.prefix_length, s.prefix_top_k, s.prefix_seed)
        texts = [subject_texts(km, r.subject, [prompt_text(p) for p in r.prompts], prefixes,
                               whole_subject=s.key_text == KeyText.subject) for r in requests]
        rows = [rewrite_rows(km, r.prompts, r.subject, r.new, prefixes) for r in requests]
        last = layers[-1]
        with self.timer("optimise"):
            targets = [self._target(km, last, r, t, w) for r, t, w in zip(requests, texts, rows)]

        fits = [s.fit] * len(requests)
        with self.timer("solve"):
            changes, updates = self._solve(km, layers, stats, requests, texts, prefixes, rows, targets, fits)
        refitted: list[int] = []
        if s.refit is not None and s.refit != s.fit:
            with self.timer("refit"):
                refitted = self._short(km, requests, changes)
            if refitted:  # solved again from the same targets δ, the short requests with the refit's keys
                fits = [s.refit if i in refitted else f for i, f in enumerate(fits)]
                with self.timer("refit"):
                    changes, updates = self._solve(km, layers, stats, requests, texts, prefixes, rows, targets, fits)
        # the refit's check already found none short: nothing to re-target (and no second check of the same edit)
        none_short = s.refit is not None and s.refit != s.fit and not refitted
        for _ in range(0 if none_short else s.retarget):
            with self.timer("retarget"):
                short = self._short(km, requests, changes)
                if not short:
                    break
                self._retarget(km, last, requests, texts, rows, targets, changes, short)
            with self.timer("solve"):
                changes, updates = self._solve(km, layers, stats, requests, texts, prefixes, rows, targets, fits)
        for target, fit in zip(targets, fits):
            target.fit = str(fit)
        weights = sum(float(km.value_weight(l).detach().double().norm()) ** 2 for l in layers) ** 0.5
        total = sum(u.update_norm ** 2 for u in updates) ** 0.5
        details = MemitDetails(layers=layers, key_text=str(s.key_text), prefixes=prefixes, null_space=s.null_space,
                               relative_update=total / max(weights, 1e-12), requests=targets, updates=updates,
                               refitted=refitted, settings=_settings_dict(s), layer_source=choice.describe())
        return changes, details

    def _solve(self, km: KnModel, layers: list[int], stats: dict, requests: list[EditRequest], texts: list, prefixes: list[str],
               rows: list, targets: list[MemitRequestDetails], fits: list[KeyFit]) -> tuple[list, list[MemitLayerDetails]]:
        """(one whole change per critical layer, their details): every layer l in order solved on top of the
        earlier ones' updates (applied as trials, reverted before returning) for the residual still missing,
        request i's keys fitted by ``fits[i]``; sets each target's ``remaining``."""
        last = layers[-1]
        deltas = torch.stack([t.delta for t in targets])  # [n, d_model]
        before = torch.stack([t.hidden for t in targets])  # h^L before the edit [n, d_model]
        changes, updates, trials = [], [], []
        try:
            with self.reporter.task(f"MEMIT over layers {layers}", total=len(layers)) as task:
                for j, layer in enumerate(layers):
                    # z − h^L now [n, d_model]; before the first layer's update h^L is ``before`` itself
                    missing = deltas - (self._hidden(km, last, rows) - before) if j else deltas
                    keys, residuals = self._fitted(km, layer, requests, texts, prefixes, missing / (len(layers) - j),
                                                   fits, stats[layer])
                    delta, update = self._update(km, layer, stats[layer], keys, residuals)
                    updates.append(update)
                    changes.append(whole_change(km, update.parameter, weight_change(km, delta)))
                    if j < len(layers) - 1:  # the next layers are solved on top of this one
                        trials.append(commit(km, "trial", [], [changes[-1]]))
                    task.advance()
            # how much of each target the edit leaves missing (the last layer's update is applied for this)
            trials.append(commit(km, "trial", [], [changes[-1]]))
            remaining = deltas - (self._hidden(km, last, rows) - before)
        finally:
            for trial in reversed(trials):
                trial.revert()
        for target, miss in zip(targets, remaining):
            target.remaining = float(miss.norm()) / max(float(target.delta.norm()), 1e-12)
        return changes, updates

    def _retarget(self, km: KnModel, last: int, requests: list[EditRequest], texts: list, rows: list,
                  targets: list[MemitRequestDetails], changes: list, short: list[int]) -> None:
        """With ``changes`` applied (as a trial, reverted before returning), each short request's δ' optimised
        again on the edited model; its target becomes z' = h^L there + δ', kept as δ = z' − h^L before the edit
        (the frame ``_solve`` works in), so the next solve aims every layer at z'."""
        trial = commit(km, "trial", [], list(changes))
        try:
            found = {i: self._target(km, last, requests[i], texts[i], rows[i]) for i in short}
        finally:
            trial.revert()
        for i, again in found.items():
            target = targets[i]
            target.delta = again.hidden + again.delta - target.hidden
            target.target_norm = float(target.delta.norm())
            target.steps += again.steps
            target.clamped, target.stopped_early = again.clamped, again.stopped_early
            target.nll_last, target.kl_last = again.nll_last, again.kl_last
            target.retargeted += 1

    @staticmethod
    def _short(km: KnModel, requests: list[EditRequest], changes: list) -> list[int]:
        """Indices of the requests whose edit prompts do not all have the new object top-1 with ``changes``
        applied (as a trial, reverted before returning)."""
        from ..report import prompt_outcomes, request_successes

        trial = commit(km, "trial", [], list(changes))
        try:
            outcomes = prompt_outcomes(km, requests)
        finally:
            trial.revert()
        return [i for i, held in enumerate(request_successes(requests, outcomes)) if not held]

    def _fitted(self, km: KnModel, layer: int, requests: list[EditRequest], texts: list, prefixes: list[str],
                residuals: torch.Tensor, fits: list[KeyFit], stats: KeyStatistics) -> tuple[torch.Tensor, torch.Tensor]:
        """(keys [m, d_ff], residuals [m, d_model]) the layer's update is solved for: each request's prefix-averaged
        key k_i with its residual r_i, and with ``fit`` prompts / rows also each edit prompt's own key (no prefix /
        after every prefix), each asking for the same r_i (as ROME's fit; kn_edit/editing/rome/update.py).
        A key repeated within a request (prompts that start with the subject share it) is one column."""
        keys, rows = [], []
        for request, text, residual, fit in zip(requests, texts, residuals, fits):
            mean = keys_at(km, layer, text).mean(dim=0)
            own = fitted_keys(km, layer, mean, request.subject, request.prompts, prefixes, fit,
                              self.settings.fit_subject_start, stats.mom2, stats.memo)
            own = _distinct(own.double())
            keys.append(own)
            rows.append(residual[None].expand(len(own), -1))
        return torch.cat(keys), torch.cat(rows).double()

    def _hidden(self, km: KnModel, layer: int, rows: list[list]) -> torch.Tensor:
        """h^L of each request now: the residual after ``layer`` averaged over its rewrite rows [n, d_model]."""
        return torch.stack([hidden_at_subject(km, layer, r).mean(dim=0) for r in rows])

    def _target(self, km: KnModel, last: int, request: EditRequest, texts, rows) -> MemitRequestDetails:
        """δ = z − h^L for one request on the model as it is (ROME's v* objective at layer L)."""
        s = self.settings
        key = keys_at(km, last, texts).mean(dim=0)
        proj = km.value_proj(last)
        with torch.no_grad():
            output = proj(key.to(km.device, proj.weight.dtype)[None])[0].float().cpu()
        found = optimise_value(km, last, rows, kl_row(km, request.subject), float(output.norm()), lr=s.lr, steps=s.steps,
                               stop_loss=s.stop_loss, kl_factor=s.kl_factor, weight_decay=s.weight_decay,
                               clamp_norm_factor=s.clamp_norm_factor, reporter=self.reporter)
        hidden = hidden_at_subject(km, last, rows).mean(dim=0)
        return MemitRequestDetails(
            subject=request.subject, old=request.old, new=request.new, target_norm=float(found.delta.norm()),
            output_norm=float(output.norm()), clamped=found.clamped, steps=len(found.losses),
            stopped_early=found.stopped_early, nll_first=found.nll[0], nll_last=found.nll[-1], kl_last=found.kl[-1],
            remaining=float("nan"), fit=str(s.fit), delta=found.delta.double(), hidden=hidden,
        )

    def _update(self, km: KnModel, layer: int, stats: KeyStatistics, keys: torch.Tensor,
                residuals: torch.Tensor) -> tuple[torch.Tensor, MemitLayerDetails]:
        """(ΔW_l [d_model, d_ff] float64, its details) for keys [n, d_ff] and residuals [n, d_model]."""
        s = self.settings
        dims = None
        if s.null_space:
            delta, space = null_space_delta(km, layer, stats.mom2, residuals.T, keys.T, s.null_space_threshold,
                                            s.null_space_ridge, space=stats.null_space(s.null_space_threshold))
            dims = space.kept
        else:
            delta = memit_delta(residuals.T, keys.T, stats.mom2, s.mom2_update_weight, s.cov_ridge, stats.memo)
        norm = float(delta.norm())
        return delta, MemitLayerDetails(
            layer=layer, parameter=value_location(km, layer)[0], update_norm=norm,
            relative_update=norm / max(float(km.value_weight(layer).detach().double().norm()), 1e-12),
            covariance_tokens=stats.n_tokens, covariance_from_cache=stats.from_cache, null_space_dims=dims,
            keys=keys.float(), residuals=residuals.float(),
        )
