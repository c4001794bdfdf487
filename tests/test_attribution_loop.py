"""The Lightning attribution loop: results match direct locating, the cache makes a rerun compute nothing."""

from __future__ import annotations

import json

import pytest
import torch

from kn_edit import DataError, LocateConfig
from kn_edit.locating.attribution import attribute_prompts
from kn_edit.locating.dataset import ScoreCache, as_fact, locate_dataset, model_identity
from kn_edit.data import FactRecord
from kn_edit.locating.locate import select

FACTS = [
    FactRecord("f1", "France", "capital", "Paris", ("The capital of France is", "France's capital is", "In France the capital is")),
    FactRecord("f2", "Italy", "capital", "Rome", ("The capital of Italy is", "Italy's capital is")),
    FactRecord("f3", "Danielle Darrieux", "birthplace", "Bordeaux", ("Danielle Darrieux was born in",)),
]


def counting(calls: list):
    def fn(km, prompts, target, **kwargs):
        calls.append((tuple(prompts), target))
        return attribute_prompts(km, prompts, target, **kwargs)

    return fn


def config(tmp_path, **overrides) -> LocateConfig:
    settings = {"steps": 3, "threshold": 0.2, "share": 0.5, "facts_per_batch": 2, "cache_dir": str(tmp_path / "cache"),
                "accelerator": "cpu", "devices": "1"}
    return LocateConfig(**{**settings, **overrides})


def test_loop_results_and_cache(tiny_factory, tmp_path):
    km = tiny_factory("llama")
    calls: list = []
    first = locate_dataset(km, FACTS, tmp_path / "run1", config(tmp_path), attribute_fn=counting(calls))
    assert len(calls) == 3 and first.computed_prompts == 6
    lines = [json.loads(l) for l in (tmp_path / "run1" / "facts.jsonl").read_text().splitlines()]
    assert [l["fact_id"] for l in lines] == ["f1", "f2", "f3"]
    from safetensors.torch import load_file

    for fact, line in zip(FACTS, lines):
        direct = attribute_prompts(km, list(fact.prompts), fact.object, steps=3)
        saved = load_file(str(tmp_path / "run1" / line["scores_file"]))["scores"]
        torch.testing.assert_close(saved, direct)
        expected = select(direct, 0.2, 0.5)
        assert [(n["layer"], n["index"]) for n in line["neurons"]] == [(n.layer, n.index) for n in expected]
        for n in line["neurons"]:
            assert n["prompt_scores"] == pytest.approx(direct[:, n["layer"], n["index"]].tolist())
    summary = json.loads((tmp_path / "run1" / "summary.json").read_text())
    assert set(summary["relations"]) == {"capital", "birthplace"}
    assert summary["relations"]["capital"]["share"] == 0.5
    first_neurons = {(n["layer"], n["index"]) for n in lines[0]["neurons"]}
    shared = {(l, i) for l, i, _ in summary["relations"]["capital"]["relation_neurons"]}
    assert first_neurons <= shared  # with two facts, 10 % of them is one fact

    # Second run over the same facts: everything comes from the cache.
    calls.clear()
    second = locate_dataset(km, FACTS, tmp_path / "run2", config(tmp_path), attribute_fn=counting(calls))
    assert calls == [] and second.computed_prompts == 0
    assert (tmp_path / "run2" / "facts.jsonl").read_text() == (tmp_path / "run1" / "facts.jsonl").read_text()

    # Other settings are other cache entries.
    locate_dataset(km, FACTS[:1], tmp_path / "run3", config(tmp_path, steps=4), attribute_fn=counting(calls))
    assert len(calls) == 1


def test_adaptive_share_per_relation(tiny_factory, tmp_path):
    km = tiny_factory("gpt2")
    cfg = config(tmp_path, adaptive=True, min_prompts=2, save_scores=False)
    result = locate_dataset(km, FACTS, tmp_path / "out", cfg)
    capital = result.relations["capital"]
    assert capital.n_facts == 2 and capital.n_facts_counted == 2
    assert capital.tried[0][0] == pytest.approx(0.7)
    assert capital.share == pytest.approx(capital.tried[-1][0]) or capital.share == pytest.approx(capital.tried[-2][0])
    assert result.relations["birthplace"].n_facts_counted == 0  # one prompt < min_prompts: the start share
    assert result.relations["birthplace"].share == pytest.approx(0.7)
    assert not (tmp_path / "out" / "scores").exists()
    assert all(f["share"] == result.relations[f["relation"]].share for f in result.facts)


def test_cache_key_changes_with_weights(tiny_factory, tmp_path):
    a = tiny_factory("gpt2", seed=0)
    b = tiny_factory("gpt2", seed=1)
    assert model_identity(a) != model_identity(b)
    before = model_identity(a)
    with torch.no_grad():
        column = a.value_vectors(1)[5].clone()
        a.value_vectors(1)[5] += 1e-3  # a small edit of one value vector
        assert model_identity(a) != before
        a.value_vectors(1)[5] = column
    assert model_identity(a) == before
    cache_a = ScoreCache(tmp_path, model_identity(a), 20, [0, 1])
    cache_b = ScoreCache(tmp_path, model_identity(b), 20, [0, 1])
    assert cache_a.key("p", "t") != cache_b.key("p", "t")
    assert cache_a.key("p", "t") != ScoreCache(tmp_path, model_identity(a), 20, [1]).key("p", "t")
    cache_a.put("p", "t", torch.ones(2, 3))
    assert torch.equal(cache_a.get("p", "t"), torch.ones(2, 3)) and cache_b.get("p", "t") is None


def test_bad_facts(tiny_factory, tmp_path):
    km = tiny_factory("llama")
    mixed = FactRecord("m", "France", "capital", "Paris", ("The capital of France is", "The capital of Italy is"))
    with pytest.raises(DataError, match="different facts mixed"):
        locate_dataset(km, [mixed], tmp_path / "o", config(tmp_path))
    with pytest.raises(DataError, match="more than once"):
        locate_dataset(km, [FACTS[0], FACTS[0]], tmp_path / "o", config(tmp_path))
    with pytest.raises(DataError, match="no facts"):
        locate_dataset(km, [], tmp_path / "o", config(tmp_path))
    with pytest.raises(DataError, match="lacks"):
        as_fact({"prompts": ["x"]})
    (tmp_path / "exists").mkdir()
    with pytest.raises(DataError, match="already exists"):
        locate_dataset(km, FACTS, tmp_path / "exists", config(tmp_path))
    assert as_fact({"fact_id": 1, "prompts": "The capital of France is", "target": "Paris"}).prompts == (
        "The capital of France is",
    )


def _ddp_worker(rank: int, port: int, tmp: str) -> None:
    import os
    from pathlib import Path

    import kn_edit
    from tiny_models import build_model

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE="2", NODE_RANK="0",
                      LOCAL_RANK=str(rank), OMP_NUM_THREADS="1")  # fmt: skip
    torch.set_num_threads(1)
    model, tokenizer = build_model("llama")
    km = kn_edit.wrap(model, tokenizer, name="tiny-llama")
    cfg = config(Path(tmp) / "ddp", strategy="ddp", devices="2")
    calls: list = []
    result = locate_dataset(km, FACTS, Path(tmp) / "ddp-out", cfg, attribute_fn=counting(calls))
    torch.save({"computed": [c[0] for c in calls], "wrote": result.out is not None}, os.path.join(tmp, f"rank{rank}.pt"))


@pytest.mark.slow
def test_ddp_two_cpu_processes_merge_into_one_result(tiny_factory, tmp_path):
    import socket

    import torch.multiprocessing as mp

    single = locate_dataset(tiny_factory("llama"), FACTS, tmp_path / "single", config(tmp_path / "one"))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_ddp_worker, args=(port, str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    assert [r["wrote"] for r in ranks] == [True, False]  # rank 0 merges and writes
    computed = [p for r in ranks for p in r["computed"]]
    assert {p for prompts in computed for p in prompts} == {p for f in FACTS for p in f.prompts}
    assert computed[:1] != [] and ranks[1]["computed"], "both ranks attributed their share of the facts"
    merged = [json.loads(l) for l in (tmp_path / "ddp-out" / "facts.jsonl").read_text().splitlines()]
    assert [f["fact_id"] for f in merged] == ["f1", "f2", "f3"]
    for got, expected in zip(merged, single.facts):  # other thread counts: float-level differences only
        assert [(n["layer"], n["index"]) for n in got["neurons"]] == [(n["layer"], n["index"]) for n in expected["neurons"]]
        assert [n["mean_score"] for n in got["neurons"]] == pytest.approx([n["mean_score"] for n in expected["neurons"]], rel=1e-4)
