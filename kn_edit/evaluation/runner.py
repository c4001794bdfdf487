"""One evaluation run, end to end: model, editor, fact set and text from an EvalConfig; Lightning's test loop;
a run directory with per-fact JSONL, metrics JSON, a markdown report and plots; the baseline comparison."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import pytorch_lightning as pl

from ..storage.config import to_yaml
from ..data.records import BenchmarkCase, FactSet
from ..editing.base import Editor
from ..errors import ConfigError
from ..storage.atomic import atomic_dir, atomic_file, check_writable
from ..storage.manifest import start_manifest, write_manifest
from ..progress import NullReporter, Reporter
from .config import EvalConfig, Mode
from .regression import Regression, compare, load_metrics

if TYPE_CHECKING:
    from ..models.model import KnModel


@dataclass
class EvalResult:
    metrics: dict[str, float]
    rows: list[dict]
    summary: dict
    per_relation: dict[str, dict[str, float]]
    probe_per_relation: dict[str, dict[str, float]]
    regressions: list[Regression] = field(default_factory=list)
    run_dir: Path | None = None
    curve: list = field(default_factory=list)  # sequential runs: Checkpoint(n_edits, metrics) in order


def build_editor(config: EvalConfig, reporter: Reporter | None = None) -> Editor:
    """The editor of ``editor.method`` (a registry name or module:Class) with ``editor.settings``."""
    from ..editing.registry import make_editor

    extras = {"reporter": reporter} if reporter is not None else {}
    return make_editor(config.editor.method, overrides=dict(config.editor.settings), **extras)


def load_passages(config: EvalConfig) -> list[str]:
    from ..data.text import text_file_passages, wiki_passages

    text = config.text
    if text.source == "none":
        return []
    if text.source == "file":
        return text_file_passages(text.path, text.passages)
    return wiki_passages(text.passages, text.path)


class ReporterProgress(pl.Callback):
    """Advances a kn-edit Reporter task per evaluated fact (process 0 only)."""

    def __init__(self, reporter: Reporter) -> None:
        self.reporter = reporter
        self._ctx = None

    def on_test_start(self, trainer, pl_module) -> None:
        if trainer.is_global_zero:
            total = len(trainer.datamodule.local_cases) if trainer.datamodule is not None else None
            self._ctx = self.reporter.task(f"editing and measuring facts (process 0: {total})", total)
            self._task = self._ctx.__enter__()

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        if self._ctx is not None:
            self._task.advance()

    def on_test_end(self, trainer, pl_module) -> None:
        if self._ctx is not None:
            self._ctx.__exit__(None, None, None)
            self._ctx = None

    def on_exception(self, trainer, pl_module, exception) -> None:
        self.on_test_end(trainer, pl_module)


class KeepInterrupt(pl.Callback):
    """Lightning answers Ctrl-C (and the CLI's SIGTERM, raised as a KeyboardInterrupt) in its loop with its
    clean-up and ``sys.exit(1)``; this keeps the interrupt so that ``run_test`` raises it again after that clean-up
    (the CLI then exits 130 or 143 with its message, and the callers' ``finally`` blocks run).

    Where the caller handles SIGTERM itself, its handler is put back for the loop: Lightning's own, which it
    installs in front, broadcasts over the process group from inside the signal handler, which hangs a
    distributed run whose other processes wait in another collective."""

    def __init__(self) -> None:
        self.interrupt: KeyboardInterrupt | None = None
        self._sigterm = None

    def setup(self, trainer, pl_module, stage) -> None:  # before Lightning installs its signal handlers
        if threading.current_thread() is threading.main_thread():
            self._sigterm = signal.getsignal(signal.SIGTERM)

    def on_test_start(self, trainer, pl_module) -> None:
        if callable(self._sigterm) and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, self._sigterm)  # Lightning's teardown restores its own record

    def on_exception(self, trainer, pl_module, exception) -> None:
        if isinstance(exception, KeyboardInterrupt):
            self.interrupt = exception


def run_test(trainer: pl.Trainer, module: pl.LightningModule, datamodule) -> None:
    """``trainer.test``, with an interrupt raised as itself rather than turned into SystemExit(1)."""
    keep = next(c for c in trainer.callbacks if isinstance(c, KeepInterrupt))
    sigint = signal.getsignal(signal.SIGINT)
    try:
        trainer.test(module, datamodule=datamodule, verbose=False)
    except SystemExit:
        if keep.interrupt is None:
            raise
        # Lightning ignores further Ctrl-C from the interrupt on, and restores it only when it was interrupted
        # after installing its own signal handlers.
        if sigint is not None and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGINT, sigint)
        raise keep.interrupt from None


def check_new_outputs(*paths: Path) -> None:
    """Refuse, before any model is loaded, a run whose folder or files exist already (an earlier run's: they are
    never touched) or cannot be written."""
    for path in paths:
        if os.path.lexists(path):
            raise ConfigError(f"{path} already exists (an earlier run's); choose another run_name, or move it away "
                              "(nothing was written)")
        check_writable(path)


def evaluate(
    config: EvalConfig,
    km: KnModel | None = None,
    editor: Editor | None = None,
    facts: FactSet | None = None,
    passages: Sequence[str] | None = None,
    reporter: Reporter | None = None,
    write: bool = True,
    datamodule=None,
    before_cache: dict | None = None,
    progress_path: str | Path | None = None,
    cases: Sequence[BenchmarkCase] | None = None,
) -> EvalResult:
    """Run the evaluation. ``km``, ``editor``, ``facts`` and ``passages`` replace what the config would load;
    ``datamodule``: a FactDataModule already set up for ``km`` (its cases are reused as they are);
    ``before_cache``: the unedited model's measurements shared by evaluations of the same cases and settings;
    ``cases``: benchmark records that replace reading ``data.path`` (data.source a benchmark);
    ``progress_path``: mode=sequential writes the checkpoints measured so far there after each one (default with
    ``write``: next to the run's folder, ``<run_dir>.progress.json``), so a stopped run keeps its curve."""
    from .datamodule import FactDataModule
    from .module import BatchEditEvaluation, EditEvaluation
    from .report import per_relation

    config.check()
    if "spawn" in str(config.trainer.strategy):
        # Spawned processes receive the model through shared memory: they would all edit the same weights.
        raise ConfigError(f"strategy {config.trainer.strategy!r} is not supported: use ddp (or auto)")
    reporter = reporter or NullReporter()
    # Named once: without run_name the name carries the start time, and the progress file must match the folder.
    run_dir = run_dir_for(config) if write else None
    own_progress = progress_path is None and run_dir is not None and config.mode == Mode.sequential
    if own_progress:
        progress_path = run_dir.with_name(run_dir.name + ".progress.json")
    if run_dir is not None:  # before the model is loaded: an existing run is never overwritten
        check_new_outputs(run_dir, *([progress_path] if own_progress else []))
    provenance = start_manifest()  # the code and command as the run starts (its manifest)
    if km is None:
        from ..models.loading import load

        km = load(config.model, device="cpu", reporter=reporter)
    editor = editor or build_editor(config)
    passages = list(passages) if passages is not None else load_passages(config)
    if datamodule is None:
        datamodule = FactDataModule(km, config.data, facts=facts, benchmark=cases)
    if config.mode == Mode.sequential:
        return _sequential(config, km, editor, datamodule, passages, reporter, run_dir, progress_path, own_progress,
                           provenance)
    batch = config.mode == Mode.batch  # one edit of every fact: one process
    module = (BatchEditEvaluation if batch else EditEvaluation)(
        km, editor, passages, probe=config.probe, fluency=config.fluency, max_text_tokens=config.text.max_tokens,
        text_batch_size=config.text.batch_size, batch_size=config.data.batch_size,
        verify_revert=config.verify_revert, before_cache=before_cache, benchmark=config.benchmark)  # fmt: skip
    trainer = _trainer(config, reporter, devices=1 if batch else None)
    clock = time.time()
    try:
        run_test(trainer, module, datamodule)
    finally:
        if batch:
            module.restore()  # the one edit reverted, bit for bit, also when the run stopped half-way
    summary = dict(datamodule.summary)
    summary |= {"seconds": round(time.time() - clock, 1), "world_size": trainer.world_size,
                "editor": editor.name} | ({"mode": "batch"} if batch else {})
    rows = module.results["rows"]
    result = EvalResult(
        metrics=module.results["metrics"], rows=rows, summary=summary, per_relation=per_relation(rows),
        probe_per_relation=module.results["probe_per_relation"],
    )  # fmt: skip
    if config.regression.baseline:
        baseline = load_metrics(config.regression.baseline)
        result.regressions = compare(result.metrics, baseline, config.regression.tolerances)
    if run_dir is not None and trainer.is_global_zero:
        result.run_dir = write_run(config, km, result, run_dir, provenance)
    return result


def _trainer(config, reporter: Reporter, devices=None) -> pl.Trainer:
    t = config.trainer
    return pl.Trainer(
        accelerator=t.accelerator, devices=devices or t.devices, strategy=t.strategy if devices is None else "auto",
        num_nodes=t.num_nodes if devices is None else 1,
        inference_mode=False,  # editors may need gradients (attribution)
        use_distributed_sampler=False,  # the DataModule shards cases itself, without padding duplicates
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        callbacks=[ReporterProgress(reporter), KeepInterrupt()],
    )  # fmt: skip


def _sequential(config, km: KnModel, editor, datamodule, passages, reporter, run_dir: Path | None,
                progress_path: str | Path | None = None, new_progress: bool = False,
                provenance: dict | None = None) -> EvalResult:
    """mode=sequential: one process, edits kept until the end, measured at the checkpoints; written to
    ``run_dir`` unless None. ``new_progress``: the progress file is this run's own, so its first write must not
    replace anything (the caller's, e.g. a comparison's kept progress, is rewritten)."""
    from .sequential import SequentialEvaluation

    started = time.time()
    on_checkpoint = None
    if progress_path is not None:
        replace = not new_progress  # whether a file already there is ours to replace

        def on_checkpoint(module) -> None:
            nonlocal replace
            write_progress(progress_path, editor.name, module, time.time() - started, overwrite=replace)
            replace = True

    module = SequentialEvaluation(km, editor, passages, config.checkpoints, config.fluency,
                                  max_text_tokens=config.text.max_tokens, text_batch_size=config.text.batch_size,
                                  batch_size=config.data.batch_size, on_checkpoint=on_checkpoint)  # fmt: skip
    trainer = _trainer(config, reporter, devices=1)
    try:
        run_test(trainer, module, datamodule)
    finally:
        module.restore()  # every edit reverted, bit for bit, also when the run stopped half-way
    summary = dict(datamodule.summary) | {"seconds": round(time.time() - started, 1), "world_size": 1,
                                          "editor": editor.name, "mode": "sequential"}  # fmt: skip
    final = dict(module.curve[-1].metrics) | {"edits/n": float(module.curve[-1].n_edits)}
    result = EvalResult(metrics=final, rows=module.rows(), summary=summary, per_relation={}, probe_per_relation={},
                        curve=list(module.curve))  # fmt: skip
    if config.regression.baseline:
        result.regressions = compare(result.metrics, load_metrics(config.regression.baseline), config.regression.tolerances)
    if run_dir is not None:
        result.run_dir = write_run(config, km, result, run_dir, provenance)
    return result


def write_progress(path: str | Path, editor: str, module, seconds: float, overwrite: bool = True) -> None:
    """The checkpoints a sequential run has measured so far, its edits' rows and its wall seconds (JSON, replaced
    atomically after each checkpoint; ``overwrite=False``: only where no file is yet)."""
    payload = {"editor": editor, "edits_made": len(module.made), "edits_planned": module.total,
               "seconds": round(seconds, 1), "written": time.strftime("%Y-%m-%d %H:%M:%S"),
               "curve": [{"n_edits": c.n_edits, **c.metrics} for c in module.curve], "rows": module.rows()}  # fmt: skip
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(path, overwrite=overwrite, what="sequential progress") as tmp:
        tmp.write_text(json.dumps(payload, indent=1, allow_nan=True, default=str))


def run_dir_for(config: EvalConfig) -> Path:
    name = config.run_name or f"{config.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    return Path(config.output_dir) / name


def write_run(config: EvalConfig, km: KnModel, result: EvalResult, target: Path,
              provenance: dict | None = None) -> Path:
    """The run's folder ``target`` (``run_dir_for(config)``, named once per run), written atomically, with its
    ``manifest.json`` (``provenance``: ``start_manifest()`` of the run's start)."""
    from .plots import curve_figure, probe_figure, relation_figure
    from .report import curve_markdown, markdown, write_jsonl

    with atomic_dir(target) as tmp:
        write_jsonl(tmp / "facts.jsonl", result.rows)
        payload = {"metrics": result.metrics, "summary": result.summary, "per_relation": result.per_relation,
                   "probe_per_relation": result.probe_per_relation,
                   "regressions": [str(r) for r in result.regressions]}  # fmt: skip
        (tmp / "metrics.json").write_text(json.dumps(payload, indent=2, sort_keys=True, allow_nan=True))
        config_yaml = to_yaml(config)
        (tmp / "config.yaml").write_text(config_yaml)
        write_manifest(tmp, provenance, config_yaml, km.device, kind="evaluate", model=km.name)
        plots = []
        if result.curve:
            curve = [{"n_edits": c.n_edits, **c.metrics} for c in result.curve]
            (tmp / "curve.json").write_text(json.dumps(curve, indent=2, allow_nan=True))
            if config.plots:
                plots.append(curve_figure({result.summary["editor"]: curve}, tmp / "curves.png").name)
        elif config.plots:
            plots.append(relation_figure(result.per_relation, tmp / "relations.png").name)
            if result.probe_per_relation and result.metrics.get("probe/facts", 0) > 0:
                plots.append(probe_figure(result.probe_per_relation, tmp / "suppress_amplify.png").name)
        text = markdown(config.name, km.name, result.summary["editor"], result.metrics, result.summary,
                        result.per_relation, result.probe_per_relation, result.regressions, plots, config_yaml)
        if result.curve:
            text = text.replace("## Per relation", curve_markdown({result.summary["editor"]: result.curve}) + "\n## Per relation", 1)
        (tmp / "report.md").write_text(text)
    return target
