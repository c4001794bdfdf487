"""Do knowledge-neuron attribution and causal tracing put a fact in the same layers?

Per fact: the layers of its knowledge neurons (from the dataset attribution) and the MLP indirect effect of each
layer at the subject's last token (causal tracing, Meng et al.: the MLP effect peaks there), traced on the first
of the fact's prompts that contains the subject. The tracing runs over the facts as a Lightning predict loop (like
the dataset attribution), each rank tracing its share; rank 0 gathers and compares per relation:

* attribution: mean layer of the neurons (each neuron weighted equally within a fact, facts equally), its
  share of neurons per layer;
* tracing: the layer of peak MLP effect per fact (its mean over facts), and the mean effect profile over layers.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Sequence

import torch

from ..storage.config import finite
from ..errors import DataError, PromptError
from .located import LocatedFact
from .tracing import make_noise, prepare, trace

if TYPE_CHECKING:
    from ..models.model import KnModel


@dataclass
class FactTrace:
    fact_id: str
    relation: str
    prompt: str
    neuron_layers: list[int]
    mlp_effect: list[float]  # [n_layers] at the subject's last token
    peak_layer: int
    clean_prob: float
    corrupted_prob: float


@dataclass
class WhereResult:
    n_layers: int
    facts: list[FactTrace]
    skipped: list[dict]
    settings: dict = field(default_factory=dict)

    def per_relation(self) -> dict[str, dict]:
        out = {}
        for rel in sorted({f.relation for f in self.facts}):
            group = [f for f in self.facts if f.relation == rel]
            out[rel] = summarize(group, self.n_layers)
        return out

    def to_dict(self) -> dict:
        return {"n_layers": self.n_layers, "settings": self.settings, "per_relation": self.per_relation(),
                "overall": summarize(self.facts, self.n_layers), "skipped": self.skipped,
                "facts": [f.__dict__ for f in self.facts]}  # fmt: skip


def summarize(group: Sequence[FactTrace], n_layers: int) -> dict:
    with_neurons = [f for f in group if f.neuron_layers]
    kn_means = [statistics.fmean(f.neuron_layers) for f in with_neurons]
    share = [0.0] * n_layers
    for f in with_neurons:
        for l in f.neuron_layers:
            share[l] += 1 / len(f.neuron_layers) / len(with_neurons)
    peaks = [f.peak_layer for f in group]
    profile = torch.tensor([f.mlp_effect for f in group]).mean(dim=0).tolist() if group else []
    return {
        "n_facts": len(group),
        "n_facts_with_neurons": len(with_neurons),
        "kn_mean_layer": statistics.fmean(kn_means) if kn_means else None,
        "kn_layer_sd": statistics.pstdev(kn_means) if len(kn_means) > 1 else 0.0 if kn_means else None,
        "kn_layer_share": share,
        "trace_mean_peak_layer": statistics.fmean(peaks) if peaks else None,
        "trace_mean_peak_effect": statistics.fmean(max(f.mlp_effect) for f in group) if group else None,
        "trace_peak_sd": statistics.pstdev(peaks) if len(peaks) > 1 else 0.0 if peaks else None,
        "trace_mlp_profile": profile,
    }


def trace_fact(km: KnModel, fact: LocatedFact, samples: int, noise_scale: float, seed: int, window: int) -> FactTrace:
    """Trace the first prompt of ``fact`` that contains its subject (PromptError if none does)."""
    if not fact.subject:
        raise PromptError(f"fact {fact.fact_id} has no subject")
    for prompt in fact.prompts:
        try:
            inp = prepare(km, prompt, fact.subject, fact.target)
        except PromptError:
            continue
        last = inp.subject_positions[1] - 1
        noise, _ = make_noise(km, inp.subject_positions[1] - inp.subject_positions[0], samples, noise_scale, seed)
        result = trace(km, prompt, fact.subject, fact.target, kinds=("mlp",), window=window, positions=[last],
                       noise=noise)  # fmt: skip
        effect = result.effects["mlp"][:, last]
        return FactTrace(fact.fact_id, fact.relation, prompt, sorted(n.layer for n in fact.neurons), effect.tolist(),
                         int(effect.argmax()), result.clean_prob, result.corrupted_prob)  # fmt: skip
    raise PromptError(f"fact {fact.fact_id}: subject {fact.subject!r} is in none of its prompts")


def _collate(batch):
    return batch


def _module(km: KnModel, samples: int, noise_scale: float, seed: int, window: int):
    import pytorch_lightning as pl

    class TracingModule(pl.LightningModule):
        """predict_step: causal tracing of a batch of facts (MLP, subject's last token, every layer)."""

        def __init__(self) -> None:
            super().__init__()
            self.net = km.model  # registered so Lightning moves it to the accelerator

        def transfer_batch_to_device(self, batch, device, dataloader_idx: int):
            return batch  # facts are text; tracing encodes and places them itself

        def predict_step(self, batch: list[LocatedFact], batch_idx: int) -> list:
            out = []
            for fact in batch:
                try:
                    out.append(trace_fact(km, fact, samples, noise_scale, seed, window))
                except PromptError as exc:
                    out.append({"fact_id": fact.fact_id, "relation": fact.relation, "reason": str(exc)})
            return out

    return TracingModule()


def where(
    km: KnModel,
    facts: Sequence[LocatedFact],
    samples: int = 10,
    noise_scale: float = 3.0,
    seed: int = 0,
    window: int = 1,
    accelerator: str = "auto",
    devices: int | str = 1,
    strategy: str = "auto",
    progress: bool = False,
) -> WhereResult | None:
    """Trace every fact (Lightning predict loop) and compare with its neurons' layers; None on ranks other than 0."""
    import pytorch_lightning as pl
    from torch.utils.data import DataLoader

    if not facts:
        raise DataError("no located facts to trace")
    finite(noise_scale, "noise_scale")
    module = _module(km, samples, noise_scale, seed, window)
    loader = DataLoader(list(facts), batch_size=1, shuffle=False, collate_fn=_collate)
    trainer = pl.Trainer(accelerator=accelerator, devices=devices, strategy=strategy, logger=False,
                         enable_checkpointing=False, enable_model_summary=False, enable_progress_bar=progress)  # fmt: skip
    batches = trainer.predict(module, dataloaders=loader, return_predictions=True) or []
    mine = [row for batch in batches for row in batch]
    if trainer.world_size > 1:
        parts: list = [None] * trainer.world_size
        torch.distributed.all_gather_object(parts, mine)
        mine = [row for part in parts for row in part]
    if not trainer.is_global_zero:
        return None
    seen, traced, skipped = set(), [], []
    for row in mine:  # samplers may repeat facts to even out the ranks
        fid = row.fact_id if isinstance(row, FactTrace) else row["fact_id"]
        if fid in seen:
            continue
        seen.add(fid)
        (traced if isinstance(row, FactTrace) else skipped).append(row)
    order = {f.fact_id: i for i, f in enumerate(facts)}
    traced.sort(key=lambda f: order[f.fact_id])
    settings = {"samples": samples, "noise_scale": noise_scale, "seed": seed, "window": window,
                "position": "subject's last token", "kind": "mlp"}  # fmt: skip
    return WhereResult(km.n_layers, traced, skipped, settings)


def markdown(result: WhereResult, model: str) -> str:
    lines = [f"# Knowledge-neuron layers vs causal-tracing MLP peak ({model})", "",
             f"Tracing: MLP output restored at the subject's last token, {result.settings['samples']} noise samples, "
             f"window {result.settings['window']}. Layers 0..{result.n_layers - 1}.", "",
             "| relation | facts | KN mean layer (sd over facts) | tracing peak layer mean (sd) | peak MLP effect (mean) |",
             "| --- | --- | --- | --- | --- |"]  # fmt: skip
    rows = list(result.per_relation().items()) + [("all", summarize(result.facts, result.n_layers))]

    def num(v) -> str:
        return "–" if v is None else f"{v:.1f}"

    for rel, s in rows:
        lines.append(f"| {rel} | {s['n_facts']} | {num(s['kn_mean_layer'])} ({num(s['kn_layer_sd'])}) | "
                     f"{num(s['trace_mean_peak_layer'])} ({num(s['trace_peak_sd'])}) | "
                     f"{'–' if s['trace_mean_peak_effect'] is None else format(s['trace_mean_peak_effect'], '.4f')} |")  # fmt: skip
    if result.skipped:
        lines += ["", f"Skipped {len(result.skipped)} facts: " + "; ".join(f"{s['fact_id']}: {s['reason']}" for s in result.skipped)]
    return "\n".join(lines) + "\n"
