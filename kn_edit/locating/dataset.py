"""Attribution over a whole data set as a Lightning loop, with a disk cache, then neuron selection per relation.

``locate_dataset(km, facts, out, config)``:

1. A :class:`AttributionModule` (LightningModule) attributes each fact's prompts in ``predict_step``, under
   ``Trainer(inference_mode=False)`` and ``torch.enable_grad()`` (integrated gradients needs gradients). It runs
   on one CPU as well as under Lightning's distributed strategies: each rank takes its share of the facts.
2. Every prompt's score tensor [L, d_ff] goes to a disk cache keyed by a hash of (model name, fingerprint and a
   digest of its value-projection and embedding weights, prompt, target, steps, layers, method version), so a
   rerun, or a run over overlapping facts, reads instead of recomputing. The cache is also how ranks merge:
   after a barrier, rank 0 reads every fact's scores from it (so with several nodes it must be a shared folder).
3. Rank 0 selects neurons per fact (coarse to fine), with a fixed share or the paper's adaptive share per
   relation, and writes the output folder atomically::

       summary.json      model, settings, per relation: share chosen, mean neurons per fact, shares tried,
                         relation_neurons [layer, index, facts]: located for >= relation_share of its facts
       facts.jsonl       per fact: id, relation, subject, target, prompts, share, neurons (layer, index,
                         mean score, prompts that kept it, score per prompt)
       scores/NNNNNN.safetensors   (save_scores) the fact's full scores [n_prompts, L, d_ff], key "scores"
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

import torch

from ..errors import DataError, PromptError
from .locate import (
    LocateConfig,
    LocateResult,
    kept_counts,
    check_layers,
    adaptive_share_from_counts,
    check_prompts,
    kept_by_prompt,
    relation_neurons,
)
from ..models.neurons import Neuron
from ..storage.digest import weights_digest as tensors_digest
from ..storage.atomic import atomic_dir, atomic_file
from ..progress import NullReporter, Reporter

if TYPE_CHECKING:
    from ..models.model import KnModel

# Bump when the attribution's numbers change, so stale cache entries are never read.
METHOD_VERSION = "ig-v1"


@dataclass(frozen=True)
class Fact:
    """One fact to attribute: its paraphrase prompts and the answer they share."""

    fact_id: str
    prompts: tuple[str, ...]
    target: str
    relation: str = ""
    subject: str | None = None


def as_fact(item: Any) -> Fact:
    """A Fact from a :class:`kn_edit.data.FactRecord` (target = its object), a Fact, or a dict with
    ``fact_id``, ``prompts``, ``target`` (optional ``relation``, ``subject``)."""
    if isinstance(item, Fact):
        fact = item
    elif all(hasattr(item, a) for a in ("fact_id", "prompts", "object", "relation", "subject")):
        fact = Fact(str(item.fact_id), tuple(item.prompts), item.object, item.relation, item.subject)
    elif isinstance(item, dict):
        missing = [k for k in ("fact_id", "prompts", "target") if k not in item]
        if missing:
            raise DataError(f"fact {item!r} lacks {missing}")
        prompts = item["prompts"]
        fact = Fact(str(item["fact_id"]), tuple([prompts] if isinstance(prompts, str) else prompts), item["target"],
                    str(item.get("relation", "")), item.get("subject"))
    else:
        raise DataError(f"cannot read a fact from {type(item).__name__}: give FactRecords or dicts")
    if not isinstance(fact.target, str) or not fact.target.strip():
        raise DataError(f"fact {fact.fact_id}: empty target")
    try:
        check_prompts(fact.prompts, fact.subject)
    except PromptError as exc:
        raise DataError(f"fact {fact.fact_id}: {exc}") from exc
    return fact


# ----- the cache -----------------------------------------------------------------------------------------
_IDENTITY_ATTR = "_kn_edit_weights_digest"


def _identity_tensors(km: KnModel) -> list[torch.Tensor]:
    """The weights the cache key covers: every value projection and the word embeddings (and the unembedding
    where it is not tied)."""
    tensors = [km.value_weight(l) for l in range(km.n_layers)]
    tensors.append(km.model.get_input_embeddings().weight)
    head = km.model.get_output_embeddings()
    if head is not None and not km.embeddings_tied:
        tensors.append(head.weight)
    return tensors


def weights_digest(km: KnModel) -> str:
    """The digest (kn_edit.storage.digest) of :func:`_identity_tensors` (about 1 s for 135M fp32 parameters). Cached on the
    model object while the model's ledger holds no active edit and none of those tensors was written in place
    since (torch counts every in-place write in the tensor's version; a write through ``.data`` escapes it)."""
    tensors = _identity_tensors(km)
    versions = tuple(int(t._version) for t in tensors)
    cached = km.model.__dict__.get(_IDENTITY_ATTR)
    if cached is not None and cached[0] == versions and not km.active_edits:
        return cached[1]
    digest = tensors_digest((str(i), t) for i, t in enumerate(tensors))
    km.model.__dict__[_IDENTITY_ATTR] = (versions, digest)
    return digest


def model_identity(km: KnModel) -> dict:
    """What distinguishes one model's scores from another's: name, shape, and a sha256 digest of the weights
    that editing methods change (value projections) plus the word embeddings."""
    return {"name": km.name, "fingerprint": km.fingerprint(), "weights": weights_digest(km)}


class ScoreCache:
    """Score tensors [L, d_ff] on disk, one safetensors file per (model, prompt, target, settings)."""

    def __init__(self, root: str | Path, identity: dict, steps: int, layers: Sequence[int]) -> None:
        self.root = Path(root).expanduser()
        self.identity = identity
        self._base = {"model": identity, "steps": steps, "layers": list(layers), "method": METHOD_VERSION}

    def key(self, prompt: str, target: str) -> str:
        payload = json.dumps({**self._base, "prompt": prompt, "target": target}, sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()

    def path(self, key: str) -> Path:
        return self.root / key[:2] / f"{key}.safetensors"

    def get(self, prompt: str, target: str) -> torch.Tensor | None:
        from safetensors.torch import load_file

        path = self.path(self.key(prompt, target))
        if not path.is_file():
            return None
        return load_file(str(path))["scores"]

    def put(self, prompt: str, target: str, scores: torch.Tensor) -> None:
        from safetensors.torch import save_file

        path = self.path(self.key(prompt, target))
        # Ranks may race on the same entry (samplers repeat facts to even out); both write the same numbers.
        with atomic_file(path, overwrite=True) as tmp:
            save_file({"scores": scores.contiguous().float().cpu()}, str(tmp), metadata={"target": target})


# ----- the Lightning loop --------------------------------------------------------------------------------
def _collate(batch: list[Fact]) -> list[Fact]:
    return batch


AttributeFn = Callable[..., torch.Tensor]


def _make_module(km: KnModel, cache: ScoreCache, steps: int, layers: list[int], attribute_fn: AttributeFn | None,
                 rows: int | None):
    import pytorch_lightning as pl

    class AttributionModule(pl.LightningModule):
        """predict_step: attribute the uncached prompts of a batch of facts and store their scores."""

        def __init__(self) -> None:
            super().__init__()
            self.net = km.model  # registered so Lightning moves it to the accelerator

        def transfer_batch_to_device(self, batch: list[Fact], device, dataloader_idx: int) -> list[Fact]:
            return batch  # texts only; attribution encodes and places them itself

        def predict_step(self, batch: list[Fact], batch_idx: int) -> list[dict]:
            if attribute_fn is None:
                from .attribution import attribute_prompts as fn
            else:
                fn = attribute_fn
            done = []
            with torch.inference_mode(False), torch.enable_grad():
                for fact in batch:
                    missing = [p for p in dict.fromkeys(fact.prompts) if cache.get(p, fact.target) is None]
                    if missing:
                        kwargs = {"batch_size": rows} if rows else {}
                        scores = fn(km, missing, fact.target, steps=steps, layers=layers, **kwargs)
                        for prompt, s in zip(missing, scores):
                            cache.put(prompt, fact.target, s)
                    done.append({"fact_id": fact.fact_id, "computed": len(missing)})
            return done

    return AttributionModule()


def run_attribution(
    km: KnModel,
    facts: Sequence[Fact],
    cache: ScoreCache,
    config: LocateConfig,
    attribute_fn: AttributeFn | None = None,
    progress: bool = False,
):
    """Fill the cache for every prompt of every fact; returns the Trainer (its strategy tells the rank)."""
    import pytorch_lightning as pl
    from torch.utils.data import DataLoader

    layers = list(range(km.n_layers)) if config.layers is None else list(config.layers)
    module = _make_module(km, cache, config.steps, layers, attribute_fn, config.attribution_rows)
    loader = DataLoader(list(facts), batch_size=config.facts_per_batch, shuffle=False, collate_fn=_collate)
    trainer = pl.Trainer(
        accelerator=config.accelerator,
        devices=int(config.devices) if config.devices.isdigit() else config.devices,
        strategy=config.strategy,
        inference_mode=False,
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=progress,
    )
    trainer.predict(module, dataloaders=loader, return_predictions=False)
    trainer.strategy.barrier()
    return trainer


# ----- selection and output ------------------------------------------------------------------------------
def _fact_scores(cache: ScoreCache, fact: Fact) -> torch.Tensor:
    """[n_prompts, L, d_ff] of a fact from the cache."""
    out = []
    for prompt in fact.prompts:
        s = cache.get(prompt, fact.target)
        if s is None:
            raise DataError(
                f"no cached scores for fact {fact.fact_id} prompt {prompt!r} after attribution; with several "
                f"nodes the cache folder ({cache.root}) must be shared by all of them"
            )
        out.append(s)
    return torch.stack(out)


@dataclass(frozen=True)
class RelationShare:
    relation: str
    share: float
    mean_neurons: float | None
    n_facts: int
    n_facts_counted: int
    tried: tuple[tuple[float, float], ...]


def choose_shares(cache: ScoreCache, facts: Sequence[Fact], config: LocateConfig) -> dict[str, RelationShare]:
    """The share of each relation: the adaptive rule when ``config.adaptive``, else ``config.share``."""
    by_relation: dict[str, list[Fact]] = {}
    for fact in facts:
        by_relation.setdefault(fact.relation, []).append(fact)
    out = {}
    for relation, group in by_relation.items():
        counts = [kept_counts(kept_by_prompt(_fact_scores(cache, f), config.threshold)) for f in group]
        if config.adaptive:
            chosen = adaptive_share_from_counts(counts, config)
            out[relation] = RelationShare(relation, chosen.share, chosen.mean_neurons, len(group),
                                          chosen.n_facts_counted, chosen.tried)
        else:
            mean = sum(int((c >= config.share * n - 1e-9).sum()) for n, c in counts) / len(counts)
            out[relation] = RelationShare(relation, config.share, mean, len(group), len(group), ())
    return out


def _fact_entry(fact: Fact, result: LocateResult, scores_file: str | None) -> dict:
    row = {l: r for r, l in enumerate(result.layers)}
    neurons = []
    for n, mean, kept in zip(result.neurons, result.mean_scores, result.kept_by):
        per_prompt = result.scores[:, row[n.layer], n.index].tolist()
        neurons.append({"layer": n.layer, "index": n.index, "mean_score": mean, "kept_by": kept, "prompt_scores": per_prompt})
    return {
        "fact_id": fact.fact_id,
        "relation": fact.relation,
        "subject": fact.subject,
        "target": fact.target,
        "prompts": list(fact.prompts),
        "share": result.share,
        "neurons": neurons,
        "scores_file": scores_file,
    }


@dataclass
class DatasetResult:
    """What :func:`locate_dataset` wrote (on rank 0; other ranks get ``out=None``). ``computed_prompts``:
    prompts this process attributed (the others came from the cache or from other ranks)."""

    out: Path | None
    facts: list[dict]
    relations: dict[str, RelationShare]
    computed_prompts: int


def write_results(
    km: KnModel, facts: Sequence[Fact], cache: ScoreCache, config: LocateConfig, out: str | Path, reporter: Reporter
) -> DatasetResult:
    from safetensors.torch import save_file

    layers = list(range(km.n_layers)) if config.layers is None else list(config.layers)
    shares = choose_shares(cache, facts, config)
    entries = []
    with atomic_dir(out) as tmp, reporter.task("selecting neurons", total=len(facts)) as task:
        if config.save_scores:
            (tmp / "scores").mkdir()
        with open(tmp / "facts.jsonl", "w", encoding="utf-8") as handle:
            for i, fact in enumerate(facts):
                scores = _fact_scores(cache, fact)
                result = LocateResult.from_scores(fact.prompts, fact.target, scores, layers, config.threshold,
                                                  shares[fact.relation].share)
                scores_file = None
                if config.save_scores:
                    scores_file = f"scores/{i:06d}.safetensors"
                    save_file({"scores": scores.contiguous()}, str(tmp / scores_file),
                              metadata={"fact_id": fact.fact_id, "layers": json.dumps(layers)})
                entry = _fact_entry(fact, result, scores_file)
                handle.write(json.dumps(entry) + "\n")
                entries.append(entry)
                task.advance()
        located: dict[str, list[list[Neuron]]] = {}
        for entry in entries:
            located.setdefault(entry["relation"], []).append([Neuron(n["layer"], n["index"]) for n in entry["neurons"]])
        relations = {}
        for r, share in sorted(shares.items()):
            shared = relation_neurons(located[r], config.relation_share)
            relations[r] = {**asdict(share), "relation_neurons": [[n.layer, n.index, c] for n, c in shared]}
        summary = {
            "model": cache.identity,
            "config": asdict(config),
            "method": METHOD_VERSION,
            "n_facts": len(facts),
            "relations": relations,
        }
        (tmp / "summary.json").write_text(json.dumps(summary, indent=2), encoding="utf-8")
    return DatasetResult(Path(out), entries, shares, 0)


def locate_dataset(
    km: KnModel,
    facts: Sequence[Any],
    out: str | Path,
    config: LocateConfig | None = None,
    attribute_fn: AttributeFn | None = None,
    reporter: Reporter | None = None,
    progress: bool = False,
) -> DatasetResult:
    """Attribute every fact (Lightning loop, disk cache), select neurons per relation, write ``out``."""
    from ..models.provision import cache_root

    config = (config or LocateConfig()).check()
    facts = [as_fact(f) for f in facts]
    if not facts:
        raise DataError("no facts to locate")
    ids = [f.fact_id for f in facts]
    if len(set(ids)) != len(ids):
        dup = next(i for i in ids if ids.count(i) > 1)
        raise DataError(f"fact id {dup!r} appears more than once: every fact's prompts must come from one record")
    if Path(out).exists():
        raise DataError(f"{out} already exists; choose a new output folder (nothing was computed)")
    layers = check_layers(km, config.layers)
    cache_dir = Path(config.cache_dir).expanduser() if config.cache_dir else cache_root() / "attribution"
    cache = ScoreCache(cache_dir, model_identity(km), config.steps, layers)
    calls = {"prompts": 0}
    fn = attribute_fn
    if fn is None:
        from .attribution import attribute_prompts

        fn = attribute_prompts

    def counted(km_: KnModel, prompts, target, **kwargs):
        calls["prompts"] += len(prompts)
        return fn(km_, prompts, target, **kwargs)

    trainer = run_attribution(km, facts, cache, config, counted, progress)
    if not trainer.is_global_zero:
        return DatasetResult(None, [], {}, calls["prompts"])
    result = write_results(km, facts, cache, config, out, reporter or NullReporter())
    result.computed_prompts = calls["prompts"]
    return result
