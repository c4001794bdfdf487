"""Probing knowledge neurons: P(target) of a fact's prompts with the neurons suppressed and amplified, next to
the same for random control neurons (Dai et al. 2022, §4.2: change ratio ΔP / P of the correct answer).

Control neurons: for each located neuron, a random neuron of the same layer that is not located, so a control
set has the located set's size and its distribution over layers. ``n_controls`` such sets are drawn with a
seeded generator and their results averaged.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence

import torch

from ..errors import KnEditError
from ..storage.config import finite
from .locate import check_prompts
from .manipulate import amplify, suppress
from ..models.neurons import Neuron, by_layer, check_neurons
from ..models.replay import keeping, replaying

if TYPE_CHECKING:
    from ..models.model import KnModel

# The baseline pass's block outputs are kept for the other conditions within this much memory.
_REPLAY_BYTES = 64 * 1024**2


def prompt_probs(km: KnModel, prompts: Sequence[str], target: str) -> torch.Tensor:
    """P(target | prompt) [n_prompts] (product over the target's teacher-forced tokens), one batched pass."""
    encoded = [km.encode(p, target) for p in prompts]
    steps = [s for e in encoded for s in e.steps]
    logp = km.step_log_probs(steps)  # [n_steps]
    sums, start = [], 0
    for e in encoded:
        sums.append(logp[start : start + len(e.steps)].sum())
        start += len(e.steps)
    return torch.stack(sums).double().exp()


def control_neurons(km: KnModel, neurons: Sequence[Neuron], generator: torch.Generator) -> list[Neuron]:
    """A random neuron of the same layer for each neuron, none of them among ``neurons``."""
    taken = set(neurons)
    out = []
    for layer, indices in by_layer(neurons).items():
        free = torch.ones(km.d_ff, dtype=torch.bool)
        free[torch.tensor([n.index for n in taken if n.layer == layer])] = False
        candidates = torch.nonzero(free, as_tuple=True)[0]
        if len(candidates) < len(indices):
            raise KnEditError(f"layer {layer} has too few other neurons to draw {len(indices)} controls from")
        pick = candidates[torch.randperm(len(candidates), generator=generator)[: len(indices)]]
        out.extend(Neuron(layer, int(i)) for i in pick.tolist())
    return sorted(out)


def change_ratio(after: torch.Tensor, before: torch.Tensor) -> torch.Tensor:
    """ΔP / P per prompt."""
    return (after - before) / before


@dataclass
class ProbeResult:
    """Probabilities [n_prompts] of the target per prompt; controls [n_controls, n_prompts]."""

    prompts: list[str]
    target: str
    neurons: list[Neuron]
    factor: float
    baseline: torch.Tensor
    suppressed: torch.Tensor
    amplified: torch.Tensor
    controls: list[list[Neuron]]
    control_suppressed: torch.Tensor
    control_amplified: torch.Tensor

    def ratios(self) -> dict[str, torch.Tensor]:
        """Change ratio ΔP/P per prompt [n_prompts] of each condition (controls averaged over their sets)."""
        return {
            "suppressed": change_ratio(self.suppressed, self.baseline),
            "amplified": change_ratio(self.amplified, self.baseline),
            "control_suppressed": change_ratio(self.control_suppressed, self.baseline).mean(dim=0),
            "control_amplified": change_ratio(self.control_amplified, self.baseline).mean(dim=0),
        }

    def mean_ratios(self) -> dict[str, float]:
        """The paper's figure: the change ratio averaged over prompts."""
        return {k: float(v.mean()) for k, v in self.ratios().items()}

    def to_dict(self) -> dict:
        ratios = self.ratios()
        return {
            "target": self.target,
            "neurons": [str(n) for n in self.neurons],
            "factor": self.factor,
            "controls": [[str(n) for n in c] for c in self.controls],
            "prompts": [
                {
                    "prompt": p,
                    "baseline": float(self.baseline[i]),
                    "suppressed": float(self.suppressed[i]),
                    "amplified": float(self.amplified[i]),
                    "control_suppressed": float(self.control_suppressed[:, i].mean()),
                    "control_amplified": float(self.control_amplified[:, i].mean()),
                    **{f"ratio_{k}": float(v[i]) for k, v in ratios.items()},
                }
                for i, p in enumerate(self.prompts)
            ],
            "mean": {
                "baseline": float(self.baseline.mean()),
                "suppressed": float(self.suppressed.mean()),
                "amplified": float(self.amplified.mean()),
                "control_suppressed": float(self.control_suppressed.mean()),
                "control_amplified": float(self.control_amplified.mean()),
                **{f"ratio_{k}": v for k, v in self.mean_ratios().items()},
            },
        }


def probe(
    km: KnModel,
    prompts: Sequence[str],
    target: str,
    neurons: Sequence[Neuron],
    n_controls: int = 3,
    seed: int = 0,
    factor: float = 2.0,
) -> ProbeResult:
    """P(target) for each prompt: unchanged, with ``neurons`` suppressed, amplified by ``factor``, and the same
    for ``n_controls`` random same-layer control sets of the same size."""
    prompts = check_prompts(prompts)
    neurons = check_neurons(neurons, km.n_layers, km.d_ff)
    if not neurons:
        raise KnEditError("no neurons to probe: locate some first (or pass --neurons LAYER:INDEX,...)")
    if isinstance(n_controls, bool) or not isinstance(n_controls, int) or n_controls < 1:
        raise KnEditError(f"n_controls must be an integer >= 1, got {n_controls!r}")
    finite(factor, "factor")
    generator = torch.Generator().manual_seed(seed)
    controls = [control_neurons(km, neurons, generator) for _ in range(n_controls)]

    # The neurons and their controls lie in the same layers, so the blocks below the lowest of them compute the
    # same in every condition: the baseline pass keeps their outputs and the others replay them.
    with keeping(km, _REPLAY_BYTES) as kept:
        baseline = prompt_probs(km, prompts, target)
    with replaying(km, kept, min(n.layer for n in neurons)):
        with suppress(km, neurons):
            suppressed = prompt_probs(km, prompts, target)
        with amplify(km, neurons, factor):
            amplified = prompt_probs(km, prompts, target)
        ctrl_s, ctrl_a = [], []
        for control in controls:
            with suppress(km, control):
                ctrl_s.append(prompt_probs(km, prompts, target))
            with amplify(km, control, factor):
                ctrl_a.append(prompt_probs(km, prompts, target))
    return ProbeResult(
        prompts=prompts,
        target=target,
        neurons=neurons,
        factor=float(factor),
        baseline=baseline,
        suppressed=suppressed,
        amplified=amplified,
        controls=controls,
        control_suppressed=torch.stack(ctrl_s),
        control_amplified=torch.stack(ctrl_a),
    )
