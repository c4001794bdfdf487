"""The ROME editor: one rank-one update of layer l's FFN value projection per request (Meng et al. 2022).

Several requests are edited one after another, each on top of the previous ones (trial changes through the
model's ledger, reverted before returning); the edit is their sum, one whole-parameter change.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import TYPE_CHECKING, Sequence

import torch

from ...progress import NullReporter, Reporter
from ..base import Editor, EditRequest
from ..ledger import commit
from ..nullspace import null_space_delta
from ..settings import with_overrides
from ..values import value_location, whole_change
from ..keyvalue.statistics import KeyStatistics, statistics_for
from ..keyvalue.keys import check_causal_requests, context_prefixes, fitted_keys, keys_at, prompt_text, subject_texts
from .settings import KeyText, RomeSettings
from ..keyvalue.solve import exact_direction
from .update import weight_change
from ..keyvalue.target import kl_row, optimise_value, rewrite_rows

if TYPE_CHECKING:
    from ...models.model import KnModel


@dataclass
class RomeRequestDetails:
    """What ROME did for one request. key: k* [d_ff]; value: v* [d_model] (the value projection's output
    the updated layer gives k*, bias included)."""

    subject: str
    old: str
    new: str
    key_norm: float  # ‖k*‖
    output_norm: float  # ‖W k*‖ before the update (bias included)
    delta_norm: float  # ‖v* − W k*‖
    clamped: bool  # ‖δ‖ ended at the norm constraint
    steps: int  # evaluations of the v* objective
    stopped_early: bool
    loss_first: float
    loss_last: float
    nll_first: float  # mean per-token NLL of new over the rewrite rows, before and after
    nll_last: float
    kl_last: float
    update_norm: float  # ‖ΔW‖ (Frobenius)
    relative_update: float  # ‖ΔW‖ / ‖W‖
    key: torch.Tensor = field(repr=False)
    value: torch.Tensor = field(repr=False)
    losses: list[float] = field(default_factory=list, repr=False)


@dataclass
class RomeDetails:
    """ROME's details (``EditReport.details``)."""

    layer: int
    parameter: str
    key_text: str
    prefixes: list[str]
    covariance_tokens: int
    covariance_corpus: str
    covariance_from_cache: bool
    covariance_seconds: float
    covariance_path: str | None
    relative_update: float  # ‖ΣΔW‖ / ‖W‖ over all requests
    requests: list[RomeRequestDetails]
    settings: dict
    layer_source: str = ""  # where the layer comes from: setting, measured (its file), table or rule


def _settings_dict(settings: RomeSettings) -> dict:
    return {k: (v.value if isinstance(v, Enum) else v) for k, v in vars(settings).items()}


class RomeEditor(Editor):
    """ROME. ``key_texts``: the text the key statistics are taken over, instead of ``cov_corpus`` (tests, or
    a domain of your own); cached under the hash of the texts."""

    name = "rome"
    config_class = RomeSettings
    can_update = True
    can_erase = False

    def __init__(self, settings: RomeSettings | None = None, *, key_texts: Sequence[str] | None = None,
                 reporter: Reporter | None = None, **overrides) -> None:
        self.settings = with_overrides(settings or RomeSettings(), overrides)
        self.key_texts = list(key_texts) if key_texts is not None else None
        self.reporter = reporter or NullReporter()

    def statistics(self, km: KnModel, layer: int) -> KeyStatistics:
        return statistics_for(km, layer, self.settings, self.key_texts, self.reporter)

    def compute(self, km: KnModel, requests: list[EditRequest]) -> tuple[list, RomeDetails]:
        s = self.settings
        check_causal_requests(km, requests, "ROME")
        choice = s.choice_for(km)
        layer = choice.layers[0]
        with self.timer("statistics"):
            stats = self.statistics(km, layer)
        with self.timer("prefixes"):
            prefixes = context_prefixes(km, s.n_prefixes, s.prefix_length, s.prefix_top_k, s.prefix_seed)
        name = value_location(km, layer)[0]
        weight_norm = float(km.value_weight(layer).detach().float().norm())
        total = torch.zeros(km.d_model, km.d_ff, dtype=torch.float64)
        trials, done = [], []
        try:
            for request in requests:
                details, delta = self._one(km, layer, stats, prefixes, request, weight_norm, [d.key for d in done])
                done.append(details)
                total += delta
                if len(done) < len(requests):  # the next request is edited on top of this one
                    trials.append(commit(km, "trial", [], [whole_change(km, name, weight_change(km, delta))]))
        finally:
            for trial in reversed(trials):
                trial.revert()
        details = RomeDetails(
            layer=layer, parameter=name, key_text=str(s.key_text), prefixes=prefixes,
            covariance_tokens=stats.n_tokens, covariance_corpus=stats.corpus, covariance_from_cache=stats.from_cache,
            covariance_seconds=stats.seconds, covariance_path=stats.path,
            relative_update=float(total.norm()) / max(weight_norm, 1e-12), requests=done, settings=_settings_dict(s),
            layer_source=choice.describe(),
        )
        return [whole_change(km, name, weight_change(km, total))], details

    def _one(self, km: KnModel, layer: int, stats: KeyStatistics, prefixes: list[str], request: EditRequest,
             weight_norm: float, earlier: Sequence[torch.Tensor] = ()) -> tuple[RomeRequestDetails, torch.Tensor]:
        """(details, ΔW [d_model, d_ff] float64) of one request on the model as it is now."""
        s = self.settings
        texts = subject_texts(km, request.subject, [prompt_text(p) for p in request.prompts], prefixes,
                              whole_subject=s.key_text == KeyText.subject)
        with self.timer("keys"):
            key = keys_at(km, layer, texts).mean(dim=0)  # k* [d_ff]
        proj = km.value_proj(layer)
        with torch.no_grad():
            output = proj(key.to(km.device, proj.weight.dtype)[None])[0].float().cpu()  # W k* (+ bias) [d_model]
        rows = rewrite_rows(km, request.prompts, request.subject, request.new, prefixes)
        with self.timer("optimise"):
            found = optimise_value(km, layer, rows, kl_row(km, request.subject), float(output.norm()), lr=s.lr,
                                   steps=s.steps, stop_loss=s.stop_loss, kl_factor=s.kl_factor,
                                   weight_decay=s.weight_decay, clamp_norm_factor=s.clamp_norm_factor,
                                   reporter=self.reporter)
        with self.timer("keys"):
            keys = fitted_keys(km, layer, key, request.subject, request.prompts, prefixes, s.fit,
                               s.fit_subject_start, stats.mom2, stats.memo)  # [m, d_ff]
        with self.timer("solve"):
            if s.null_space:  # AlphaEdit; earlier: this call's earlier requests' keys, kept too
                residuals = found.delta.to(torch.float64)[:, None].expand(-1, len(keys))  # [d_model, m]
                delta = null_space_delta(km, layer, stats.mom2, residuals, keys.T, s.null_space_threshold,
                                         s.null_space_ridge, torch.stack(list(earlier)) if earlier else None,
                                         space=stats.null_space(s.null_space_threshold))[0]
            else:
                direction = exact_direction(stats.mom2, keys, s.cov_ridge, stats.memo)  # w [d_ff]
                delta = torch.outer(found.delta.to(torch.float64), direction)  # ΔW = δ wᵀ [d_model, d_ff]
        norm = float(delta.norm())
        details = RomeRequestDetails(
            subject=request.subject, old=request.old, new=request.new, key_norm=float(key.norm()),
            output_norm=float(output.norm()), delta_norm=float(found.delta.norm()), clamped=found.clamped,
            steps=len(found.losses), stopped_early=found.stopped_early, loss_first=found.losses[0],
            loss_last=found.losses[-1], nll_first=found.nll[0], nll_last=found.nll[-1], kl_last=found.kl[-1],
            update_norm=norm, relative_update=norm / max(weight_norm, 1e-12), key=key, value=output + found.delta,
            losses=found.losses,
        )
        return details, delta
