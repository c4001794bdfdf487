"""The known-fact cache: the top-1 check of a fact set is computed once per model and reused, with the same
selection as computing it afresh; damaged or foreign files are never trusted."""

from __future__ import annotations

import json

import pytest
import torch

from kn_edit.data.records import FactRecord, FactSet
from kn_edit.evaluation import datamodule as dm
from kn_edit.evaluation.config import DataConfig
from kn_edit.evaluation.known_cache import KnownCache, parameters_digest


def tiny_fact_set() -> FactSet:
    pairs = [("France", "Paris"), ("Italy", "Rome"), ("Japan", "Tokyo"), ("Spain", "Madrid"), ("Chile", "Lima"),
             ("Peru", "Lima")]
    return FactSet("tiny", [FactRecord(f"f{i}", s, "capital", o, (f"The capital of {s} is",), ())
                            for i, (s, o) in enumerate(pairs)])  # fmt: skip


def rule(records) -> list[bool]:
    """A stand-in for the top-1 check (a random tiny model knows no fact): every other fact is known."""
    return [int(r.fact_id[1:]) % 2 == 0 for r in records]


def counting(monkeypatch) -> list[int]:
    """known_mask replaced by ``rule``; returns the list of how many facts each call checked."""
    seen: list[int] = []

    def spy(km, records, min_share=0.5, batch_size=64):
        seen.append(len(records))
        return rule(records)

    monkeypatch.setattr(dm, "known_mask", spy)
    return seen


def test_a_second_selection_reads_every_flag_from_the_cache(tiny_factory, tmp_path, monkeypatch):
    monkeypatch.setenv("KN_EDIT_CACHE", str(tmp_path))
    km = tiny_factory("llama")
    facts = tiny_fact_set()
    plain = rule(facts.records)
    seen = counting(monkeypatch)
    config = DataConfig(neighbours=1)
    first = dm.FactDataModule(km, config, facts=facts)
    first.setup("test")
    assert sum(seen) == len(facts.records)
    second = dm.FactDataModule(km, config, facts=facts)
    second.setup("test")
    assert sum(seen) == len(facts.records)  # nothing recomputed
    assert [c.fact.fact_id for c in second.cases] == [c.fact.fact_id for c in first.cases]
    assert sorted(c.fact.fact_id for c in first.cases) == [r.fact_id for r, k in zip(facts.records, plain) if k]
    cache = KnownCache(km, tmp_path / "known")
    assert cache.lookup(facts.records, 1.0) == plain


def test_without_the_cache_every_run_checks_again(tiny_factory, tmp_path, monkeypatch):
    monkeypatch.setenv("KN_EDIT_CACHE", str(tmp_path))
    km = tiny_factory("llama")
    facts = tiny_fact_set()
    seen = counting(monkeypatch)
    for _ in range(2):
        dm.FactDataModule(km, DataConfig(neighbours=1, known_cache=False), facts=facts).setup("test")
    assert sum(seen) == 2 * len(facts.records)
    assert not (tmp_path / "known").exists()


def test_other_weights_other_file_and_other_rule_other_key(tiny_factory, tmp_path):
    km = tiny_factory("llama")
    facts = tiny_fact_set()
    cache = KnownCache(km, tmp_path)
    cache.store(facts.records, [True] * len(facts.records), 1.0)
    assert KnownCache(km, tmp_path).lookup(facts.records, 1.0) == [True] * len(facts.records)
    assert KnownCache(km, tmp_path).lookup(facts.records, 0.5) == [None] * len(facts.records)
    digest = parameters_digest(km)
    with torch.no_grad():
        km.model.model.norm.weight[0] += 1.0  # not a value projection or embedding: still another model
    assert parameters_digest(km) != digest
    assert KnownCache(km, tmp_path).lookup(facts.records, 1.0) == [None] * len(facts.records)


def test_concurrent_writers_merge_and_a_damaged_file_is_recomputed(tiny_factory, tmp_path):
    km = tiny_factory("llama")
    records = tiny_fact_set().records
    a, b = KnownCache(km, tmp_path), KnownCache(km, tmp_path)  # two processes that read the file at once
    a.store(records[:3], [True, False, True], 1.0)
    b.store(records[3:], [False, True, False], 1.0)
    assert KnownCache(km, tmp_path).lookup(records, 1.0) == [True, False, True, False, True, False]
    a.path.write_text("{not json")
    assert KnownCache(km, tmp_path).lookup(records, 1.0) == [None] * len(records)
    a.path.write_text(json.dumps({"flags": {"x": "yes"}}))
    assert KnownCache(km, tmp_path).flags == {}


@pytest.mark.parametrize("cached", [0, 3, 6])
def test_selection_with_a_partly_filled_cache_equals_a_fresh_one(tiny_factory, tmp_path, monkeypatch, cached):
    km = tiny_factory("llama")
    facts = tiny_fact_set()
    counting(monkeypatch)
    config = DataConfig(neighbours=1, check_chunk=4)
    fresh, _ = dm.select_known(km, facts, config, dm._Usable(km))
    cache = KnownCache(km, tmp_path)
    cache.store(facts.records[:cached], rule(facts.records[:cached]), 1.0)
    again, _ = dm.select_known(km, facts, config, dm._Usable(km), cache)
    assert [r.fact_id for r in again] == [r.fact_id for r in fresh]
