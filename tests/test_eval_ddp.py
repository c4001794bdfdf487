"""The evaluation loop under Lightning's DDP strategy on two CPU processes gives the single-process numbers,
and leaves each process's model bit for bit unchanged.

The two processes are started here (as a cluster launcher would) and each builds its own model: Lightning's
``ddp_spawn`` would pickle the module into shared memory, so both processes would edit the same weights.
"""

from __future__ import annotations

import os
import socket

import pytest
import pytorch_lightning as pl
import torch
import torch.multiprocessing as mp

import kn_edit
from helpers import PASSAGES, ValueVectorEditor, assert_same, benchmark_cases, snapshot, tiny_config, tiny_facts
from kn_edit.evaluation import EditEvaluation, FactDataModule, evaluate
from tiny_models import build_model


def _worker(rank: int, port: int, tmp: str, bench: bool = False) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE="2", NODE_RANK="0",
                      LOCAL_RANK=str(rank), OMP_NUM_THREADS="1")  # fmt: skip
    torch.set_num_threads(1)
    from pathlib import Path

    config = tiny_config(Path(tmp))
    model, tokenizer = build_model("llama")
    km = kn_edit.wrap(model, tokenizer)
    before = snapshot(km)
    if bench:  # the field's benchmarks: CounterFact-style cases
        config.data.source, config.data.path = "counterfact", "given.json"
        datamodule = FactDataModule(km, config.data, benchmark=benchmark_cases()["counterfact"])
    else:
        datamodule = FactDataModule(km, config.data, facts=tiny_facts())
    module = EditEvaluation(km, ValueVectorEditor(), PASSAGES, probe=config.probe, fluency=config.fluency)
    trainer = pl.Trainer(accelerator="cpu", devices=2, strategy="ddp", inference_mode=False, use_distributed_sampler=False,
                         logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)  # fmt: skip
    trainer.test(module, datamodule=datamodule, verbose=False)
    assert_same(km, before)
    torch.save({"metrics": module.results["metrics"], "facts": [r["fact_id"] for r in module.results["rows"]],
                "local": len(datamodule.local_cases)}, os.path.join(tmp, f"rank{rank}.pt"))  # fmt: skip
    # Tear the process group down before the interpreter does: gloo's threads left to process exit can abort it
    # ("terminate called without an active exception", SIGABRT) after the work is done.
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_on_two_cpu_processes_matches_one_process(tiny_factory, tmp_path):
    single = evaluate(tiny_config(tmp_path), km=tiny_factory("llama"), editor=ValueVectorEditor(), facts=tiny_facts(),
                      passages=PASSAGES, write=False)  # fmt: skip
    mp.spawn(_worker, args=(_free_port(), str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    assert [r["local"] for r in ranks] == [5, 5]  # each process edited its own half
    for got in ranks:  # every process holds the reduced metrics and all per-fact rows
        assert got["facts"] == [r["fact_id"] for r in single.rows]
        assert got["metrics"].keys() == single.metrics.keys()
        # fp32 probabilities: ratios of ~1e-4 differ by ~1e-7 between batchings, hence abs=1e-6.
        timing = {"edit/seconds", "run/peak_memory_mb"}  # wall time and memory differ between runs
        ours = {k: v for k, v in got["metrics"].items() if k not in timing}
        assert ours == pytest.approx({k: v for k, v in single.metrics.items() if k not in timing}, rel=1e-6,
                                     abs=1e-6, nan_ok=True)


def test_ddp_benchmark_cases_split_over_processes_give_the_one_process_table(tiny_factory, tmp_path):
    config = tiny_config(tmp_path, **{"data.source": "counterfact", "data.path": "given.json"})
    single = evaluate(config, km=tiny_factory("llama"), editor=ValueVectorEditor(), cases=benchmark_cases()["counterfact"],
                      passages=PASSAGES, write=False)  # fmt: skip
    mp.spawn(_worker, args=(_free_port(), str(tmp_path), True), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    assert [r["local"] for r in ranks] == [2, 1]
    table = {k: v for k, v in single.metrics.items() if k.startswith("counterfact/")}
    assert {"counterfact/ES", "counterfact/GE", "counterfact/RS"} <= set(table)
    for got in ranks:  # every process gathers every case's row, so every process has the whole table
        assert {k: v for k, v in got["metrics"].items() if k.startswith("counterfact/")} == pytest.approx(table, abs=1e-6)


def _compare_worker(rank: int, port: int, tmp: str, mode: str = "single") -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE="2", NODE_RANK="0",
                      LOCAL_RANK=str(rank), OMP_NUM_THREADS="1")  # fmt: skip
    torch.set_num_threads(1)
    from pathlib import Path

    from kn_edit.evaluation.compare import compare_methods
    from test_compare import tiny_compare_config

    shards = []
    own = FactDataModule.test_dataloader

    def recorded(self):  # how many cases this process edits, per method
        shards.append(len(self.local_cases))
        return own(self)

    FactDataModule.test_dataloader = recorded
    config = tiny_compare_config(Path(tmp) / "ddp")
    config.trainer.devices, config.trainer.strategy = 2, "ddp"
    config.mode = mode
    model, tokenizer = build_model("llama")
    km = kn_edit.wrap(model, tokenizer, name="tiny-llama")
    before = snapshot(km)
    result = compare_methods(config, km=km, facts=tiny_facts(), passages=PASSAGES)
    assert_same(km, before)
    torch.save({"metrics": result.flat_metrics(), "run_dir": result.run_dir, "shards": shards,
                "facts": {t: [r["fact_id"] for r in res.rows] for t, res in result.results.items()}},
               os.path.join(tmp, f"compare-{mode}{rank}.pt"))  # fmt: skip
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


# Cases each process measures, per evaluation of the comparison (its methods' ways in order). mode=batch: each
# method's one edit of every fact (``METHOD/batch``) runs in a one-device trainer; before the processes exist
# (the first method's) each process measures every fact, afterwards its own half, the rows gathered.
SHARDS = {"single": [5, 5], "batch": [10, 5, 5, 5]}
PARTS = {"single": ["kn-unscaled.json", "value-vector.json"],
         "batch": ["kn-unscaled_batch.json", "kn-unscaled_single.json", "value-vector_batch.json", "value-vector_single.json"]}


@pytest.mark.parametrize("mode", ["single", "batch"])
def test_compare_under_ddp_splits_the_facts_and_process_zero_alone_writes(tmp_path, mode):
    from test_compare import tiny_compare_config

    from kn_edit.evaluation.compare import compare_methods

    config = tiny_compare_config(tmp_path / "one")
    config.mode = mode
    single = compare_methods(config, km=kn_edit.wrap(*build_model("llama"), name="tiny-llama"), facts=tiny_facts(),
                             passages=PASSAGES)  # fmt: skip
    mp.spawn(_compare_worker, args=(_free_port(), str(tmp_path), mode), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"compare-{mode}{r}.pt", weights_only=False) for r in range(2)]
    # the cases were set up before the processes existed; each process still edits only its own half
    assert [r["shards"] for r in ranks] == [SHARDS[mode]] * 2
    timing = ("seconds", "memory")
    expected = {k: v for k, v in single.flat_metrics().items() if not any(t in k for t in timing)}
    for got in ranks:  # every process ends with every fact's row and the one-process numbers
        assert got["facts"] == {t: [r["fact_id"] for r in res.rows] for t, res in single.results.items()}
        ours = {k: v for k, v in got["metrics"].items() if not any(t in k for t in timing)}
        assert ours == pytest.approx(expected, rel=1e-6, abs=1e-6, nan_ok=True)
    # process 0 kept each method's part and wrote the report; process 1 wrote nothing
    assert ranks[0]["run_dir"] is not None and (ranks[0]["run_dir"] / "metrics.json").is_file()
    assert ranks[1]["run_dir"] is None
    parts = sorted(p.name for p in (tmp_path / "ddp" / ".tiny.parts").iterdir())
    assert parts == PARTS[mode]


@pytest.mark.parametrize("env, rich", [({}, True), ({"LOCAL_RANK": "0"}, True), ({"LOCAL_RANK": "1"}, False),
                                       ({"LOCAL_RANK": "0", "NODE_RANK": "1"}, False)])
def test_only_process_zero_draws_progress_bars(monkeypatch, env, rich):
    from kn_edit.progress import NullReporter, RichReporter, default_reporter

    for name in ("LOCAL_RANK", "NODE_RANK"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert isinstance(default_reporter(), RichReporter if rich else NullReporter)
    assert isinstance(default_reporter(quiet=True), NullReporter)
