"""The fact-set DataModule: reads a data set, keeps the facts the model knows, and builds one EditCase per
fact to edit (request, new object, and the facts measured for interference). All data work is in ``setup``.

Distributed runs: the top-1 check is split across processes and gathered, so every process ends with the
same cases; each process then evaluates its own slice ``cases[rank::world_size]`` (no sampler padding, so no
fact is counted twice).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader

from ..data.jsonl import load_jsonl_facts
from ..data.known1000 import load_known1000
from ..data.pararel import load_pararel
from ..data.records import BenchmarkCase, FactRecord, FactSet, SkippedFact
from ..data.requests import choose_new_object, edit_request, known_mask, relation_objects, unusable_reason
from ..data.records import EditRequest
from ..errors import DataError, KnEditError
from ..models.provision import cache_root
from .known_cache import KnownCache
from .benchmark import pairs_of
from .benchmark_metrics import BENCHMARKS, groups_of
from .config import DataConfig

if TYPE_CHECKING:
    from ..models.model import KnModel


@dataclass(frozen=True)
class EditCase:
    """One fact to edit and what to measure around it."""

    index: int
    fact: FactRecord
    new: str
    relation_index: int
    same_relation: tuple[FactRecord, ...]  # other facts of the fact's relation (intra-relation interference)
    other_relation: tuple[FactRecord, ...]  # facts of other relations (inter-relation interference)
    benchmark: BenchmarkCase | None = None  # the benchmark record this case comes from (data.source a benchmark)

    @property
    def request(self) -> EditRequest:
        return edit_request(self.fact, self.new)

    @property
    def requests(self) -> tuple[EditRequest, ...]:
        """What one edit of this case applies: the benchmark record's requests (MQuAKE: several), else the fact's."""
        return self.benchmark.requests if self.benchmark is not None else (self.request,)


def benchmark_edit_case(index: int, case: BenchmarkCase, relation_index: int) -> EditCase:
    """A benchmark record as an EditCase, so kn-edit's own metrics map onto it: the fact is its first request
    (prompts = the rewrite prompts, held-out = paraphrase prompts answered by the new object), the same-relation
    facts are its neighborhood probes and the other-relation facts its locality probes (gold = the probe's
    answer)."""
    request = case.requests[0]
    held = tuple(p for probe in case.probes_of("paraphrase") if probe.answer == request.new for p in probe.prompts)
    relation = request.relation or case.source
    fact = FactRecord(case.case_id, request.subject or "", relation, request.old, request.prompts, held)
    probes = lambda kind: tuple(FactRecord(f"{case.case_id}:{kind}{j}", "", relation, p.answer, p.prompts)  # noqa: E731
                                for j, p in enumerate(case.probes_of(kind)))  # fmt: skip
    return EditCase(index, fact, request.new, relation_index, probes("neighborhood"), probes("locality"), case)


def load_benchmark_cases(config: DataConfig) -> tuple[list[BenchmarkCase], list[SkippedFact]]:
    """The cases of ``data.path`` and the records its reader set aside (with their reasons)."""
    from ..data.benchmarks import load_benchmark  # the readers of the field's files

    cases = load_benchmark(config.source, config.path)
    return list(cases), list(getattr(cases, "skipped", []))


def _encoding_problem(km: KnModel, case: BenchmarkCase) -> str | None:
    """Why some prompt or target of the case cannot be measured with this model (None: all can)."""
    try:
        for _, prompt, target in pairs_of(groups_of(case)):
            km.encode(prompt, target)
    except KnEditError as exc:
        return str(exc)
    return None


def load_facts(config: DataConfig, masked: bool) -> FactSet:
    if config.source == "pararel":
        return load_pararel(config.path, masked=masked, relations=config.relations, heldout_fraction=config.heldout_fraction,
                            seed=config.seed, max_prompts=config.max_prompts, download=config.download,
                            heldout=config.heldout)  # fmt: skip
    if config.source == "known1000":
        facts = load_known1000(config.path, masked=masked, download=config.download)
    else:
        facts = load_jsonl_facts(config.path, masked=masked)
    if config.relations:
        unknown = sorted(set(config.relations) - {r.relation for r in facts.records})
        if unknown:
            raise DataError(f"relations {unknown} are not in {facts.name}")
        facts = FactSet(facts.name, [r for r in facts.records if r.relation in set(config.relations)], facts.skipped)
    return facts


def _interleave(groups: Sequence[Sequence[FactRecord]]) -> list[FactRecord]:
    """Round-robin over the groups, so limits spread over relations."""
    out, depth = [], max((len(g) for g in groups), default=0)
    for i in range(depth):
        out += [g[i] for g in groups if i < len(g)]
    return out


def process_rank_and_world() -> tuple[int, int]:
    """(this process's rank, the number of processes) in a distributed run; (0, 1) outside one."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def _gathered_known(km: KnModel, chunk: list[FactRecord], config: DataConfig,
                    cache: KnownCache | None = None) -> list[bool]:
    """known_mask over the chunk, split across processes and gathered (identical on every process); flags found
    in ``cache`` are not recomputed, and the computed ones are added to it."""
    rank, world = process_rank_and_world()
    cached = cache.lookup(chunk, config.known_min_share) if cache is not None else [None] * len(chunk)
    if world > 1 and cache is not None:  # every process must check the same facts: rank 0's view of the cache
        shared = [cached]
        torch.distributed.broadcast_object_list(shared, src=0)
        cached = shared[0]
    todo = [r for r, flag in zip(chunk, cached) if flag is None]
    mine = known_mask(km, todo[rank::world], config.known_min_share, config.batch_size)
    if world == 1:
        computed = mine
    else:
        parts: list = [None] * world
        torch.distributed.all_gather_object(parts, mine)
        computed = [False] * len(todo)
        for r, flags in enumerate(parts):
            computed[r::world] = flags
    if cache is not None and rank == 0:
        cache.store(todo, computed, config.known_min_share)
    fresh = iter(computed)
    return [flag if flag is not None else next(fresh) for flag in cached]


class _Usable:
    """Memoized "can this model use this fact" (see ``unusable_reason``); reasons of the unusable ones kept."""

    def __init__(self, km: KnModel) -> None:
        self.km = km
        self.seen: dict[str, SkippedFact | None] = {}

    def __call__(self, record: FactRecord) -> bool:
        if record.fact_id not in self.seen:
            self.seen[record.fact_id] = unusable_reason(self.km, record)
        return self.seen[record.fact_id] is None

    @property
    def skipped(self) -> list[SkippedFact]:
        return [s for s in self.seen.values() if s is not None]


def select_known(km: KnModel, facts: FactSet, config: DataConfig, usable: _Usable,
                 cache: KnownCache | None = None) -> tuple[list[FactRecord], list[SkippedFact]]:
    """(facts to edit, facts found not known), checking candidates in a seeded order, relations interleaved,
    chunk by chunk until the limits are met. Facts left unchecked then are neither (the summary counts them)."""
    by_relation = facts.by_relation()
    shuffled = []
    for relation in sorted(by_relation):
        group = list(by_relation[relation])
        random.Random(f"{config.seed}:{relation}:order").shuffle(group)
        shuffled.append(group)
    candidates = _interleave(shuffled)
    per_relation: dict[str, int] = {}
    chosen: list[FactRecord] = []
    unknown: list[SkippedFact] = []
    checked = 0
    limit_met = lambda: config.max_facts is not None and len(chosen) >= config.max_facts  # noqa: E731
    full = lambda r: config.facts_per_relation is not None and per_relation.get(r.relation, 0) >= config.facts_per_relation  # noqa: E731
    while checked < len(candidates) and not limit_met():
        chunk = candidates[checked : checked + config.check_chunk]
        checked += len(chunk)
        todo = [r for r in chunk if not full(r) and usable(r)]
        flags = _gathered_known(km, todo, config, cache) if config.only_known else [True] * len(todo)
        for record, known in zip(todo, flags):
            if not known:
                unknown.append(SkippedFact(record.fact_id, record.relation, "model does not predict it (top-1)"))
            elif not full(record) and not limit_met():
                chosen.append(record)
                per_relation[record.relation] = per_relation.get(record.relation, 0) + 1
    return chosen, unknown


def _neighbours(pool: Sequence[FactRecord], k: int, rng: random.Random, usable: _Usable) -> list[FactRecord]:
    """Up to k usable facts of ``pool`` in a seeded order."""
    order = list(range(len(pool)))
    rng.shuffle(order)
    out = []
    for i in order:
        if len(out) == k:
            break
        if usable(pool[i]):
            out.append(pool[i])
    return out


def _sample(pool: Sequence[FactRecord], k: int, rng: random.Random) -> tuple[FactRecord, ...]:
    return tuple(rng.sample(list(pool), min(k, len(pool))))


class FactDataModule(pl.LightningDataModule):
    """Edit cases of a fact set for one model. ``facts`` (optional) replaces reading ``config``'s source."""

    def __init__(self, km: KnModel, config: DataConfig, facts: FactSet | None = None,
                 benchmark: Sequence[BenchmarkCase] | None = None) -> None:
        super().__init__()
        self.km = km
        self.config = config
        self.facts = facts
        self.benchmark = benchmark  # replaces reading a benchmark file (data.source counterfact | zsre | ...)
        self.cases: list[EditCase] | None = None
        self.relations: list[str] = []
        self.summary: dict = {}

    def setup(self, stage: str | None = None) -> None:
        if self.cases is not None:
            # Set up before the run's processes existed (``compare`` shares one set of cases across methods):
            # each process's slice is taken again now that this one knows its rank.
            self._shard()
            return
        if self.trainer is not None:
            # The top-1 check runs here, before Lightning moves the model; put it on this process's device now.
            self.km.model.to(self.trainer.strategy.root_device)
        cfg = self.config
        if self.benchmark is not None or (self.facts is None and cfg.source in BENCHMARKS):
            return self._setup_benchmark()
        loaded = self.facts if self.facts is not None else load_facts(cfg, self.km.is_masked_lm)
        if not loaded.records:
            raise DataError(f"{loaded.name}: the fact set is empty" + _skipped_note(loaded.skipped))
        usable = _Usable(self.km)
        cache = KnownCache(self.km, cache_root() / "known") if cfg.only_known and cfg.known_cache else None
        chosen, unknown = select_known(self.km, loaded, cfg, usable, cache)
        objects = relation_objects(loaded.records)
        by_relation = loaded.by_relation()
        self.relations = sorted(by_relation)
        cases, no_object = [], []
        for record in chosen:
            can_encode = lambda new: unusable_reason(self.km, record, new) is None  # noqa: E731
            new = choose_new_object(record, objects[record.relation], cfg.seed, can_encode)
            if new is None:
                no_object.append(SkippedFact(record.fact_id, record.relation, "relation has no other usable object"))
                continue
            rng = random.Random(f"{cfg.seed}:{record.fact_id}:neighbours")
            same = [r for r in by_relation[record.relation] if r.fact_id != record.fact_id]
            others = [r for r in loaded.records if r.relation != record.relation]
            trim = lambda rs: tuple(  # noqa: E731
                FactRecord(r.fact_id, r.subject, r.relation, r.object, r.all_prompts[: cfg.neighbour_prompts]) for r in rs
            )
            cases.append(EditCase(len(cases), record, new, self.relations.index(record.relation),
                                  trim(_neighbours(same, cfg.neighbours, rng, usable)),
                                  trim(_neighbours(others, cfg.neighbours, rng, usable))))  # fmt: skip
        skipped = list(loaded.skipped) + usable.skipped + unknown + no_object
        if not cases:
            if not chosen and not unknown:
                raise DataError(f"{loaded.name}: no fact is usable with this model" + _skipped_note(skipped))
            raise DataError(f"{loaded.name}: no fact to edit: the model predicts none of them" + _skipped_note(skipped))
        self._keep(cases, skipped)
        self.summary = {
            "data": loaded.name,
            "facts_loaded": len(loaded.records) + len(loaded.skipped),
            "facts_checked": len(usable.seen),
            "facts_edited": len(cases),
            "facts_not_selected_limit": len(loaded.records) - len(chosen) - len(unknown) - len(usable.skipped),
            "skipped": _counts(skipped),
            "relations": self.relations,
        }

    def _keep(self, cases: list[EditCase], skipped: list[SkippedFact]) -> None:
        self.cases = cases
        self.skipped = skipped
        self._shard()

    def _shard(self) -> None:
        """This process's slice of the cases, ``cases[rank::world]``."""
        rank, world = process_rank_and_world()
        if len(self.cases) < world:
            raise DataError(f"{len(self.cases)} facts to edit cannot be split over {world} processes; use fewer devices")
        self.local_cases = self.cases[rank::world]

    def _setup_benchmark(self) -> None:
        """Benchmark records in file order: those whose prompts and targets this model can encode and (only_known)
        whose every request's old object is its top-1 on the rewrite prompts, up to data.max_facts."""
        cfg = self.config
        records, skipped = (list(self.benchmark), []) if self.benchmark is not None else load_benchmark_cases(cfg)
        name = f"{records[0].source} ({cfg.path or 'given cases'})" if records else str(cfg.path)
        if not records:
            raise DataError(f"{name}: the benchmark file holds no record")
        if cfg.relations:
            records = [c for c in records if (c.requests[0].relation or c.source) in set(cfg.relations)]
        cache = KnownCache(self.km, cache_root() / "known") if cfg.only_known and cfg.known_cache else None
        chosen: list[BenchmarkCase] = []
        read_skipped = len(skipped)
        checked = 0
        while checked < len(records) and (cfg.max_facts is None or len(chosen) < cfg.max_facts):
            chunk = records[checked : checked + cfg.check_chunk]
            checked += len(chunk)
            todo = []
            for case in chunk:
                problem = _encoding_problem(self.km, case)
                if problem is None:
                    todo.append(case)
                else:
                    skipped.append(SkippedFact(case.case_id, case.source, "cannot be encoded", problem))
            facts = [FactRecord(f"{c.case_id}#{j}", r.subject or "", r.relation or c.source, r.old, r.prompts)
                     for c in todo for j, r in enumerate(c.requests)]  # fmt: skip
            flags = iter(_gathered_known(self.km, facts, cfg, cache) if cfg.only_known else [True] * len(facts))
            for case in todo:
                known = all([next(flags) for _ in case.requests])
                if not known:
                    skipped.append(SkippedFact(case.case_id, case.source, "model does not predict it (top-1)"))
                elif cfg.max_facts is None or len(chosen) < cfg.max_facts:
                    chosen.append(case)
        self.relations = sorted({c.requests[0].relation or c.source for c in chosen})
        cases = [benchmark_edit_case(i, c, self.relations.index(c.requests[0].relation or c.source))
                 for i, c in enumerate(chosen)]  # fmt: skip
        if not cases:
            raise DataError(f"{name}: no case to edit" + _skipped_note(skipped))
        self._keep(cases, skipped)
        self.summary = {
            "data": name,
            "facts_loaded": len(records) + read_skipped,
            "facts_checked": checked,
            "facts_edited": len(cases),
            "facts_not_selected_limit": len(records) - len(chosen) - (len(skipped) - read_skipped),
            "skipped": _counts(skipped),
            "relations": self.relations,
        }

    def transfer_batch_to_device(self, batch, device, dataloader_idx):
        return batch  # an EditCase holds text; KnModel puts token ids on the model's device itself

    def test_dataloader(self) -> DataLoader:
        if self.cases is None:
            raise DataError("FactDataModule.setup() has not run")
        return DataLoader(self.local_cases, batch_size=None, collate_fn=_identity)


def _identity(case: EditCase) -> EditCase:
    return case


def _counts(skipped: Sequence[SkippedFact]) -> dict[str, int]:
    return FactSet("", [], list(skipped)).skipped_counts()


def _skipped_note(skipped: Sequence[SkippedFact]) -> str:
    counts = _counts(skipped)
    return f" (skipped: {', '.join(f'{n} {reason}' for reason, n in counts.items())})" if counts else ""
