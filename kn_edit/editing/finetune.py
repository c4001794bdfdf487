"""Constrained fine-tuning of one layer's FFN value projection: FT-L and FT-M.

The baseline of Zhu et al. 2020 ("Modifying Memories in Transformer Models") as Meng et al. 2022 (ROME) use
it: Adam on one weight matrix W (layer l's FFN value projection, the same matrix ROME and the knowledge-neuron
editors change) to make every edit prompt of every request continue with its new object, with the change
kept in an L∞ ball after every step:

    W ← clamp(W, W0 − ε, W0 + ε),   ε = norm_bound · scale(W0)

Meng et al. state ε in absolute units (5e-4 for GPT-2 XL), which means something else for every model: the
value weights of smollm2-135m are ~5× larger, so the same ε is a far tighter bound there. Here ε is relative
to the layer's weight scale by default (``bound_unit=mean_abs``: the mean |entry| of W0, the typical size of
the entries the L∞ bound limits one by one; less driven by a few outlier entries than the standard deviation,
``bound_unit=std``); ``bound_unit=absolute`` takes ``norm_bound`` as ε itself, e.g. ROME's 5e-4.

Losses (``loss``; every request's prompts jointly, each prompt weighs the same: the loss is the mean over
prompts of the mean negative log-likelihood over that prompt's scored tokens, teacher-forced):

* ``full``: language-model loss on the whole edited sentence "prompt + new", every token after the first
  (fine-tuning on the new fact's text, as Zhu et al. do with the modified facts' sentences);
* ``masked``: only the new object's tokens (FT-M: the prompt's tokens are masked out of the loss);
* ``last``: every token of new scored at the prompt's last position, not teacher-forced (the FT-L objective
  of ROME's experiments, which EasyEdit calls ``prompt_last``); equal to ``masked`` for one-token objects.

Early stopping: before each step, every token of new after every prompt (teacher-forced, the report's test of
success) is checked; once each leads every other token by ``margin`` logits, the optimisation stops. The
model runs in eval mode (no dropout) so the optimisation is deterministic.

Nothing of the model changes while it runs: the weight is replaced functionally
(``torch.func.functional_call``) by W0 + δ with δ the only tensor optimised, and the result is handed to the
ledger as one whole-parameter additive change, so it stacks with other edits of the layer and reverts bit for
bit. Requests are updates only (no erasure).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from enum import Enum
from typing import TYPE_CHECKING, Callable, Optional, Sequence

import torch

from ..storage.config import INF_ALLOWED
from ..errors import ConfigError, EditError
from ..progress import NullReporter, Reporter
from .base import Editor, EditRequest
from .ledger import SliceChange
from .settings import Choice, as_choice, with_overrides
from .values import value_location, whole_change

if TYPE_CHECKING:
    from ..models.model import KnModel


class FtLoss(Choice):
    full = "full"
    masked = "masked"
    last = "last"


class BoundUnit(Choice):
    mean_abs = "mean_abs"
    std = "std"
    absolute = "absolute"


# Layer fine-tuned by default, per model. smollm2-135m: a sweep over layers 0-25 on 15 ParaRel facts it knows at
# norm_bound 0.05 (evaluations/results/ft_layers.md): layer 0 made 93 % of the edits succeed, layer 2 53 %,
# layers 5-25 at most 40 %, with other facts kept alike. GPT-2 family and GPT-J: layer 0, the setting of the
# FT-L hyper-parameter files distributed with ROME-derived code (GPT-2 medium / XL, GPT-J). Other models: 0 too.
MODEL_LAYERS = {"smollm2-135m": 0}
FAMILY_LAYERS = {"gpt2": 0, "gptj": 0}


def default_layer(km: KnModel) -> int:
    """The layer to fine-tune when none is given: the model's entry in MODEL_LAYERS (by kn-edit's model name
    or the checkpoint folder's name), then its family's in FAMILY_LAYERS, else layer 0 (the first FFN, what
    the published FT-L settings use for every model they list)."""
    names = {str(km.name)}
    path = getattr(getattr(km.model, "config", None), "_name_or_path", None)
    if path:
        names.add(str(path).rstrip("/").split("/")[-1])
    for name in names:
        if name in MODEL_LAYERS:
            return MODEL_LAYERS[name]
    return FAMILY_LAYERS.get(km.adapter.family, 0)


@dataclass
class FineTuneSettings:
    """Settings of ``ft`` (FT-L) and ``ft-m`` (FT-M: ``loss=masked``); ``configs/methods/ft*.yaml``."""

    layer: Optional[int] = None  # the value projection to fine-tune; null = the model's default (default_layer)
    loss: FtLoss = FtLoss.full  # full | masked | last (module docstring)
    steps: int = 25  # at most this many Adam steps
    lr: float = 5e-4  # Adam's learning rate (Adam moves each entry by ~lr per step, whatever the gradient's scale)
    # ε = norm_bound × the weight scale of bound_unit; .inf: no bound (the one setting where infinity is allowed)
    norm_bound: float = field(default=0.05, metadata=INF_ALLOWED)
    bound_unit: BoundUnit = BoundUnit.mean_abs  # mean_abs | std | absolute (ε = norm_bound)
    margin: float = 1.0  # stop once every token of new leads every other token by this many logits

    def check(self) -> "FineTuneSettings":
        self.loss = as_choice(FtLoss, self.loss, "loss")
        self.bound_unit = as_choice(BoundUnit, self.bound_unit, "bound_unit")
        if self.layer is not None and (isinstance(self.layer, bool) or not isinstance(self.layer, int) or self.layer < 0):
            raise ConfigError(f"layer must be a layer index >= 0 or null (the model's default), got {self.layer!r}")
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 1:
            raise ConfigError(f"steps must be an integer >= 1, got {self.steps!r}")
        if not (isinstance(self.lr, (int, float)) and math.isfinite(self.lr) and self.lr > 0):
            raise ConfigError(f"lr must be a finite number > 0, got {self.lr!r}")
        if not (isinstance(self.norm_bound, (int, float)) and self.norm_bound > 0):  # NaN fails too
            raise ConfigError(f"norm_bound must be > 0 (.inf for no bound), got {self.norm_bound!r}")
        if not (isinstance(self.margin, (int, float)) and math.isfinite(self.margin) and self.margin >= 0):
            raise ConfigError(f"margin must be a finite number >= 0 (logits), got {self.margin!r}")
        return self


@dataclass
class FineTuneStep:
    """The weight after ``step`` Adam steps: the loss and smallest margin there, and max |W − W0|."""

    step: int
    loss: float
    min_margin: float  # over every token of new after every prompt (teacher-forced), logits
    max_change: float  # max |W − W0| of the weight measured (float32)


@dataclass
class FineTuneDetails:
    """What the fine-tuning editor did (``EditReport.details``)."""

    layer: int
    parameter: str
    loss: str
    bound_unit: str
    weight_scale: float  # mean |W0|, std(W0), or 1 (absolute)
    epsilon: float  # the L∞ bound on W − W0 (inf: none)
    steps: int  # Adam steps taken
    reached: bool  # stopped early: every token of new top-1 with the margin
    history: list[FineTuneStep] = field(default_factory=list)  # step 0 (W0) to the weight returned
    settings: dict = field(default_factory=dict)

    @property
    def final(self) -> FineTuneStep:
        return self.history[-1]


def weight_scale(weight: torch.Tensor, unit: BoundUnit | str) -> float:
    """The unit ε is measured in: mean |W|, the standard deviation of W's entries, or 1."""
    unit = as_choice(BoundUnit, unit, "bound_unit")
    if unit == BoundUnit.absolute:
        return 1.0
    w = weight.detach().float()
    return float(w.abs().mean()) if unit == BoundUnit.mean_abs else float(w.std())


@dataclass(frozen=True)
class _Row:
    """One sequence of the batch. loss_*: the (position, token) pairs the loss scores; check_*: every token
    of new (teacher-forced), the early-stopping test; prompt: the prompt it belongs to."""

    input_ids: torch.Tensor  # [seq]
    loss_positions: tuple[int, ...]
    loss_targets: tuple[int, ...]
    check_positions: tuple[int, ...]
    check_targets: tuple[int, ...]
    prompt: int


def _rows(km: KnModel, requests: Sequence[EditRequest], loss: FtLoss) -> tuple[list[_Row], int]:
    """The batch for every prompt of every request, and the number of prompts."""
    if km.is_masked_lm and loss != FtLoss.masked:
        raise EditError(f"loss={loss.value} needs a causal language model; a masked LM is fine-tuned with loss=masked")
    rows: list[_Row] = []
    n = 0
    for request in requests:
        for prompt in request.prompts:
            steps = km.encode(prompt, request.new).steps
            if km.is_masked_lm:  # one sequence per teacher-forced step (j masks, the earlier tokens filled in)
                for s in steps:
                    at = ((s.position,), (s.target_id,))
                    rows.append(_Row(s.input_ids, *at, *at, n))
            else:
                last = steps[-1]
                ids = torch.cat([last.input_ids, torch.tensor([last.target_id])])  # prompt + every token of new
                check = (tuple(s.position for s in steps), tuple(s.target_id for s in steps))
                if loss == FtLoss.full:
                    scored = (tuple(range(len(ids) - 1)), tuple(int(t) for t in ids[1:]))
                elif loss == FtLoss.masked:
                    scored = check
                else:  # last: every token of new at the prompt's last position
                    scored = ((steps[0].position,) * len(steps), check[1])
                rows.append(_Row(ids, *scored, *check, n))
            n += 1
    return rows, n


class _Batch:
    """The rows padded once, with flat indices of the scored and checked logits."""

    def __init__(self, km: KnModel, rows: list[_Row], n_prompts: int) -> None:
        self.ids, self.mask = km.pad([r.input_ids for r in rows])
        dev = self.ids.device
        flat = lambda attr: torch.tensor([i for i, r in enumerate(rows) for _ in getattr(r, attr)], device=dev)  # noqa: E731
        cat = lambda attr: torch.tensor([p for r in rows for p in getattr(r, attr)], device=dev)  # noqa: E731
        self.loss_rows, self.loss_pos, self.loss_tgt = flat("loss_positions"), cat("loss_positions"), cat("loss_targets")
        self.check_rows, self.check_pos, self.check_tgt = flat("check_positions"), cat("check_positions"), cat("check_targets")
        self.loss_prompt = torch.tensor([r.prompt for r in rows for _ in r.loss_positions], device=dev)
        self.n_prompts = n_prompts

    def objective(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(loss [], margins [n_checked]) from the batch's logits [batch, seq, vocab]: the loss is the mean
        over prompts of each prompt's mean NLL over its scored tokens; a margin is the logit of new's token
        minus the largest other logit."""
        scored = torch.log_softmax(logits[self.loss_rows, self.loss_pos].float(), dim=-1)  # [n_scored, vocab]
        nll = -scored.gather(1, self.loss_tgt[:, None]).squeeze(1)
        total = torch.zeros(self.n_prompts, device=nll.device).index_add(0, self.loss_prompt, nll)
        count = torch.zeros(self.n_prompts, device=nll.device).index_add(0, self.loss_prompt, torch.ones_like(nll))
        loss = (total / count).mean()
        checked = logits[self.check_rows, self.check_pos].detach().float()  # [n_checked, vocab]
        rows = torch.arange(len(self.check_tgt), device=checked.device)
        gold = checked[rows, self.check_tgt].clone()
        checked[rows, self.check_tgt] = float("-inf")
        return loss, gold - checked.max(dim=-1).values


def _forward(km: KnModel, name: str, weight: torch.Tensor, batch: _Batch) -> torch.Tensor:
    """Logits [batch, seq, vocab] of the model with parameter ``name`` replaced by ``weight`` (functionally)."""
    out = torch.func.functional_call(km.model, {name: weight}, args=(),
                                     kwargs={"input_ids": batch.ids, "attention_mask": batch.mask})
    return out.logits


def finetune_loss(km: KnModel, requests: Sequence[EditRequest], loss: FtLoss | str = FtLoss.full,
                  layer: int | None = None,
                  delta: torch.Tensor | None = None) -> tuple[float, torch.Tensor]:
    """(loss, margins [n_checked]) of the requests on the model as it is, or with ``delta`` added to layer's
    value weight (functionally): the objective the editor minimises, for inspection and tests."""
    loss = as_choice(FtLoss, loss, "loss")
    rows, n = _rows(km, list(requests), loss)
    batch = _Batch(km, rows, n)
    layer = default_layer(km) if layer is None else layer
    name = value_location(km, layer)[0]
    param = km.model.get_parameter(name)
    weight = param.detach() if delta is None else (param.detach().float() + delta.to(param.device)).to(param.dtype)
    with torch.no_grad():
        value, margins = batch.objective(_forward(km, name, weight, batch))
    return float(value), margins.cpu()


# on_step(record, weight): called with every history entry and the weight it measured ([param shape], detached).
StepCallback = Callable[[FineTuneStep, torch.Tensor], None]


class FineTuneEditor(Editor):
    """FT-L / FT-M: Adam on one layer's FFN value projection under an L∞ bound (module docstring).

    on_step: called after every evaluation of the weight (step 0 is W0), e.g. to watch the constraint."""

    name = "ft"
    config_class = FineTuneSettings

    def __init__(self, settings: FineTuneSettings | None = None, *, reporter: Reporter | None = None,
                 on_step: StepCallback | None = None, **overrides) -> None:
        self.settings = with_overrides(settings or FineTuneSettings(), overrides)
        self.reporter = reporter or NullReporter()
        self.on_step = on_step
        if self.settings.loss == FtLoss.masked:
            self.name = "ft-m"

    def compute(self, km: KnModel, requests: list[EditRequest]) -> tuple[list[SliceChange], FineTuneDetails]:
        s = self.settings
        layer = default_layer(km) if s.layer is None else s.layer
        if layer >= km.n_layers:
            raise ConfigError(f"layer must be in [0, {km.n_layers - 1}] for this model, got {layer}")
        name = value_location(km, layer)[0]
        param = km.model.get_parameter(name)
        # Lightning loops (and callers) may run under inference_mode / no_grad; the optimisation needs gradients,
        # and tensors made under inference_mode cannot take part in it, so everything is made in here.
        with torch.inference_mode(False), torch.enable_grad(), self.timer("optimise"), \
                self.reporter.task(f"fine-tuning layer {layer}", total=s.steps) as task:
            with self.timer("prepare"):
                batch = _Batch(km, *_rows(km, requests, s.loss))
            w0 = param.detach().to(torch.float32, copy=True)
            scale = weight_scale(w0, s.bound_unit)
            eps = s.norm_bound * scale
            details = FineTuneDetails(layer=layer, parameter=name, loss=s.loss.value, bound_unit=s.bound_unit.value,
                                      weight_scale=scale, epsilon=eps, steps=0, reached=False,
                                      settings={k: (v.value if isinstance(v, Enum) else v) for k, v in vars(s).items()})
            delta = torch.zeros_like(w0, requires_grad=True)  # W = W0 + δ; only δ is optimised
            optimizer = torch.optim.Adam([delta], lr=s.lr)
            for step in range(s.steps + 1):
                last = step == s.steps
                with torch.set_grad_enabled(not last):
                    weight = (w0 + delta).to(param.dtype)
                    loss, margins = batch.objective(_forward(km, name, weight, batch))
                    record = FineTuneStep(step, float(loss.detach()), float(margins.min()),
                                          float((weight.detach().float() - w0).abs().max()))
                details.history.append(record)
                if self.on_step is not None:
                    self.on_step(record, weight.detach())
                if record.min_margin >= s.margin:
                    details.reached = True
                    break
                if last:
                    break
                (grad,) = torch.autograd.grad(loss, [delta])
                delta.grad = grad
                optimizer.step()
                with torch.no_grad():
                    if math.isfinite(eps):
                        delta.clamp_(-eps, eps)  # the L∞ projection, after every step
                details.steps = step + 1
                task.advance()
        return [whole_change(km, name, delta.detach().cpu())], details
