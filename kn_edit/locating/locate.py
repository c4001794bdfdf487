"""Selecting knowledge neurons from attribution scores, "coarse to fine" (Dai et al. 2022, §3.2):

1. per prompt, keep the neurons whose score exceeds ``threshold`` × that prompt's largest score;
2. per fact, keep the neurons kept by at least a ``share`` of the fact's paraphrase prompts.

For data-set runs the paper adapts the share per relation: it starts at 0.7 and moves in 0.05 steps until the
facts of the relation have between 2 and 5 neurons on average (facts with fewer than 3 prompts left out of that
average); :func:`adaptive_share` is that rule. The selection functions work on score tensors alone, so they are
tested against a plain reference without any model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Optional, Sequence

import torch

from .attribution import check_layers
from ..errors import ConfigError, PromptError
from ..models.neurons import Neuron
from ..storage.config import check_finite

if TYPE_CHECKING:
    from ..models.model import KnModel

# Shares are compared as count >= share * n_prompts; this absorbs float error in e.g. 0.7 - 3 * 0.05.
_SHARE_EPS = 1e-9


@dataclass
class LocateSettings:
    """How a fact's knowledge neurons are located: the one set of locating settings, used by every editor
    that locates, by probing and (extended by LocateConfig) by data-set runs."""

    steps: int = 20  # integrated-gradients steps m
    threshold: float = 0.2  # t: per prompt, keep score > t * max(score)
    share: float = 0.5  # p: per fact, keep neurons kept by >= p of its prompts (fixed-share runs)
    layers: Optional[list[int]] = None  # layers to score (None: all)

    def check_locate(self) -> None:
        check_settings(self.threshold, self.share, self.steps)


@dataclass
class LocateConfig(LocateSettings):
    """Settings of locating (``configs/locate.yaml`` holds the defaults; override with ``key=value``)."""

    adaptive: bool = False  # data-set runs: adapt p per relation (the paper's rule) instead of a fixed share
    share_start: float = 0.7
    share_step: float = 0.05
    target_min: float = 2.0  # the adaptive rule aims at this many neurons per fact on average ...
    target_max: float = 5.0  # ... and at most this many
    min_prompts: int = 3  # facts with fewer prompts do not count towards the adaptive average
    # Data-set runs (kn-edit locate-dataset):
    facts_per_batch: int = 4  # facts per Lightning batch
    attribution_rows: Optional[int] = None  # rows (scaled copies) per attribution pass; None: sized from memory
    save_scores: bool = True  # write every fact's full score tensor (safetensors)
    relation_share: float = 0.1  # summary: a relation's neurons are those located for >= this share of its facts
    cache_dir: Optional[str] = None  # attribution cache; None: $KN_EDIT_CACHE/attribution
    accelerator: str = "auto"  # Lightning Trainer settings
    devices: str = "auto"
    strategy: str = "auto"

    def check(self) -> "LocateConfig":
        check_finite(self)  # done by load_config too; here for configs built in Python
        self.check_locate()
        if not 0.0 < self.share_start <= 1.0:
            raise ConfigError(f"share_start must be in (0, 1], got {self.share_start}")
        if not 0.0 < self.share_step < 1.0:
            raise ConfigError(f"share_step must be in (0, 1), got {self.share_step}")
        if not 0.0 <= self.target_min <= self.target_max:
            raise ConfigError(f"need 0 <= target_min <= target_max, got {self.target_min} and {self.target_max}")
        if self.min_prompts < 1:
            raise ConfigError(f"min_prompts must be at least 1, got {self.min_prompts}")
        if self.facts_per_batch < 1:
            raise ConfigError(f"facts_per_batch must be at least 1, got {self.facts_per_batch}")
        if not 0.0 < self.relation_share <= 1.0:
            raise ConfigError(f"relation_share must be in (0, 1], got {self.relation_share}")
        if self.attribution_rows is not None and self.attribution_rows < 1:
            raise ConfigError(f"attribution_rows must be at least 1 (or null), got {self.attribution_rows}")
        if self.devices != "auto" and not all(p.strip().isdigit() for p in self.devices.split(",")):
            raise ConfigError(f"devices must be auto, a count (2) or device ids (0,1), got {self.devices!r}")
        return self


def check_settings(threshold: float, share: float, steps: int | None = None) -> None:
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not 0.0 < threshold <= 1.0:
        raise ConfigError(f"threshold must be in (0, 1] (a fraction of each prompt's largest score), got {threshold}")
    if isinstance(share, bool) or not isinstance(share, (int, float)) or not 0.0 < share <= 1.0:
        raise ConfigError(f"share must be in (0, 1] (the fraction of prompts that must keep a neuron), got {share}")
    if steps is not None and (isinstance(steps, bool) or not isinstance(steps, int) or steps < 1):
        raise ConfigError(f"steps must be an integer >= 1, got {steps!r}")


def check_prompts(prompts: Sequence[str], subject: str | None = None) -> list[str]:
    """The prompts as a list; refuse none, non-strings, and (with ``subject``) prompts of another fact."""
    if isinstance(prompts, str):
        prompts = [prompts]
    prompts = list(prompts)
    if not prompts:
        raise PromptError("no prompts: give at least one prompt that expresses the fact")
    for p in prompts:
        if not isinstance(p, str) or not p.strip():
            raise PromptError(f"empty or non-text prompt {p!r}")
    if subject is not None:
        if not subject.strip():
            raise PromptError("empty subject")
        strangers = [p for p in prompts if subject.casefold() not in p.casefold()]
        if strangers:
            raise PromptError(
                f"prompts of different facts mixed: {strangers} do not mention the subject {subject!r}; "
                "locate one fact (its paraphrases) at a time"
            )
    return prompts


# ----- selection on score tensors ---------------------------------------------------------------------
def kept_by_prompt(scores: torch.Tensor, threshold: float) -> torch.Tensor:
    """Coarse step. scores [n_prompts, L, d_ff] → bool [n_prompts, L, d_ff]: score > threshold * max of its prompt.

    A prompt whose largest score is <= 0 keeps nothing (no neuron raises its answer)."""
    if scores.dim() != 3:
        raise ValueError(f"scores must be [n_prompts, n_layers, d_ff], got shape {tuple(scores.shape)}")
    peak = scores.flatten(1).max(dim=1).values  # [n_prompts]
    return (scores > threshold * peak[:, None, None]) & (peak[:, None, None] > 0)


def refine(kept: torch.Tensor, share: float) -> torch.Tensor:
    """Fine step. kept [n_prompts, L, d_ff] → bool [L, d_ff]: kept by at least ``share`` of the prompts."""
    n = kept.shape[0]
    return kept.sum(dim=0) >= share * n - _SHARE_EPS


def neurons_of(mask: torch.Tensor, layers: Sequence[int], order_by: torch.Tensor | None = None) -> list[Neuron]:
    """The Neurons where mask [L_selected, d_ff] is set; row r is model layer ``layers[r]``.
    Ordered by ``order_by`` [L_selected, d_ff] descending when given, else by (layer, index)."""
    rows, cols = torch.nonzero(mask, as_tuple=True)
    found = [Neuron(int(layers[r]), int(c)) for r, c in zip(rows.tolist(), cols.tolist())]
    if order_by is not None:
        keys = order_by[rows, cols].tolist()
        found = [n for _, n in sorted(zip(keys, found), key=lambda kv: (-kv[0], kv[1]))]
    return found


def select(
    scores: torch.Tensor, threshold: float = 0.2, share: float = 0.5, layers: Sequence[int] | None = None
) -> list[Neuron]:
    """Knowledge neurons from scores [n_prompts, L_selected, d_ff] of one fact, strongest mean score first."""
    check_settings(threshold, share)
    layers = list(range(scores.shape[1])) if layers is None else list(layers)
    return neurons_of(refine(kept_by_prompt(scores, threshold), share), layers, order_by=scores.mean(dim=0))


# ----- locating with a model -----------------------------------------------------------------------------
@dataclass
class LocateResult:
    """What :func:`locate_detailed` found for one fact.

    scores: [n_prompts, L_selected, d_ff] attribution scores; row r of dim 1 is model layer ``layers[r]``.
    neurons: the knowledge neurons, strongest mean score first; ``mean_scores[i]`` (over all prompts) and
    ``kept_by[i]`` (how many prompts kept it in the coarse step) belong to ``neurons[i]``.
    """

    prompts: list[str]
    target: str
    layers: list[int]
    scores: torch.Tensor
    threshold: float
    share: float
    neurons: list[Neuron] = field(default_factory=list)
    mean_scores: list[float] = field(default_factory=list)
    kept_by: list[int] = field(default_factory=list)

    @classmethod
    def from_scores(
        cls, prompts: Sequence[str], target: str, scores: torch.Tensor, layers: Sequence[int], threshold: float, share: float
    ) -> "LocateResult":
        check_settings(threshold, share)
        layers = list(layers)
        kept = kept_by_prompt(scores, threshold)
        mean = scores.mean(dim=0)
        neurons = neurons_of(refine(kept, share), layers, order_by=mean)
        row = {l: r for r, l in enumerate(layers)}
        counts = kept.sum(dim=0)
        return cls(
            prompts=list(prompts),
            target=target,
            layers=layers,
            scores=scores,
            threshold=threshold,
            share=share,
            neurons=neurons,
            mean_scores=[float(mean[row[n.layer], n.index]) for n in neurons],
            kept_by=[int(counts[row[n.layer], n.index]) for n in neurons],
        )

    def with_share(self, share: float) -> "LocateResult":
        """The same scores refined with another share (no new attribution)."""
        return LocateResult.from_scores(self.prompts, self.target, self.scores, self.layers, self.threshold, share)

    @property
    def kept(self) -> torch.Tensor:
        """bool [n_prompts, L_selected, d_ff]: the coarse per-prompt selection."""
        return kept_by_prompt(self.scores, self.threshold)

    def kept_per_layer(self) -> dict[int, int]:
        """{layer: number of neurons kept by at least one prompt}."""
        counts = self.kept.any(dim=0).sum(dim=1)
        return {l: int(c) for l, c in zip(self.layers, counts.tolist())}

    def to_dict(self) -> dict:
        return {
            "prompts": self.prompts,
            "target": self.target,
            "threshold": self.threshold,
            "share": self.share,
            "layers": self.layers,
            "neurons": [
                {"layer": n.layer, "index": n.index, "mean_score": s, "kept_by": k, "n_prompts": len(self.prompts)}
                for n, s, k in zip(self.neurons, self.mean_scores, self.kept_by)
            ],
        }


def locate_detailed(
    km: KnModel,
    prompts: Sequence[str],
    target: str,
    threshold: float = 0.2,
    share: float = 0.5,
    steps: int = 20,
    layers: Sequence[int] | None = None,
    subject: str | None = None,
) -> LocateResult:
    """Attribute every prompt of one fact and select its knowledge neurons (see :class:`LocateResult`)."""
    from .attribution import attribute_prompts

    check_settings(threshold, share, steps)
    prompts = check_prompts(prompts, subject)
    layers = check_layers(km, layers)
    scores = attribute_prompts(km, prompts, target, steps=steps, layers=layers)  # [n_prompts, L_selected, d_ff]
    return LocateResult.from_scores(prompts, target, scores.float().cpu(), layers, threshold, share)


def locate(
    km: KnModel,
    prompts: Sequence[str],
    target: str,
    threshold: float = 0.2,
    share: float = 0.5,
    steps: int = 20,
    layers: Sequence[int] | None = None,
    subject: str | None = None,
) -> list[Neuron]:
    """The knowledge neurons of the fact that ``prompts`` (paraphrases) complete with ``target``,
    strongest mean attribution first. With ``subject``, every prompt must mention it."""
    return locate_detailed(km, prompts, target, threshold, share, steps, layers, subject).neurons


# ----- the paper's adaptive share -------------------------------------------------------------------------
@dataclass(frozen=True)
class AdaptiveShare:
    """The share chosen for one relation, the mean neurons per fact there, and every (share, mean) tried."""

    share: float
    mean_neurons: float | None  # None when no fact had enough prompts
    tried: tuple[tuple[float, float], ...]
    n_facts_counted: int


def kept_counts(kept: torch.Tensor) -> tuple[int, torch.Tensor]:
    """(n_prompts, counts [k]): how many prompts kept each neuron kept by at least one."""
    counts = kept.flatten(1).sum(dim=0)
    return kept.shape[0], counts[counts > 0]


def adaptive_share(kept_per_fact: Sequence[torch.Tensor], config: LocateConfig | None = None) -> AdaptiveShare:
    """The paper's per-relation share: start at ``share_start``; while the mean number of neurons per fact
    (over facts with >= ``min_prompts`` prompts) is below ``target_min`` lower the share by ``share_step``,
    while above ``target_max`` raise it. Stops inside [target_min, target_max], at the bounds of (0, 1], or
    when one step jumps over the interval (then the share of the two whose mean lies nearer the interval).

    kept_per_fact: one bool tensor [n_prompts, ...] per fact, the coarse per-prompt selection.
    """
    return adaptive_share_from_counts([kept_counts(k) for k in kept_per_fact], config)


def adaptive_share_from_counts(
    facts: Sequence[tuple[int, torch.Tensor]], config: LocateConfig | None = None
) -> AdaptiveShare:
    """:func:`adaptive_share` from compact per-fact data: (n_prompts, counts [k] of prompts keeping each
    neuron that at least one prompt kept), so a data-set run need not hold every fact's masks."""
    cfg = (config or LocateConfig()).check()
    counted = [(n, c) for n, c in facts if n >= cfg.min_prompts]
    if not counted:
        return AdaptiveShare(cfg.share_start, None, (), 0)

    def mean_at(share: float) -> float:
        return sum(int((c >= share * n - _SHARE_EPS).sum()) for n, c in counted) / len(counted)

    def distance(m: float) -> float:
        return max(cfg.target_min - m, 0.0, m - cfg.target_max)

    share = round(cfg.share_start, 10)
    mean = mean_at(share)
    tried = [(share, mean)]
    if distance(mean) > 0:
        direction = -1.0 if mean < cfg.target_min else 1.0  # fewer neurons than wanted → ask fewer prompts to agree
        while True:
            nxt = round(share + direction * cfg.share_step, 10)
            if not 0.0 < nxt <= 1.0:
                break
            m = mean_at(nxt)
            tried.append((nxt, m))
            if distance(m) == 0 or (direction < 0 and m > cfg.target_max) or (direction > 0 and m < cfg.target_min):
                if distance(m) < distance(mean):
                    share, mean = nxt, m
                break
            share, mean = nxt, m
    return AdaptiveShare(share, mean, tuple(tried), len(counted))


def mean_neurons(kept_per_fact: Sequence[torch.Tensor], share: float) -> float:
    """Mean number of neurons per fact at ``share`` (all facts given)."""
    if not kept_per_fact:
        return math.nan
    return sum(int(refine(k, share).sum()) for k in kept_per_fact) / len(kept_per_fact)


def relation_neurons(neurons_per_fact: Sequence[Sequence[Neuron]], min_share: float = 0.1) -> list[tuple[Neuron, int]]:
    """Neurons located for at least ``min_share`` of a relation's facts (KN_METHOD.md step 3: a relation's
    neurons, for erasing it; also the "too generic" ones an update should skip), with how many facts located
    each, most shared first."""
    if not 0.0 < min_share <= 1.0:
        raise ConfigError(f"min_share must be in (0, 1], got {min_share}")
    counts: dict[Neuron, int] = {}
    for neurons in neurons_per_fact:
        for n in set(neurons):
            counts[n] = counts.get(n, 0) + 1
    needed = min_share * len(neurons_per_fact) - _SHARE_EPS
    return sorted(((n, c) for n, c in counts.items() if c >= needed), key=lambda nc: (-nc[1], nc[0]))
