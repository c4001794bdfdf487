"""Settings of an evaluation run (``configs/eval/*.yaml``; every key overridable as ``key=value``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Optional

from ..storage.config import check_finite
from ..errors import ConfigError
from ..locating.locate import LocateSettings
from .benchmark_metrics import BENCHMARKS


@dataclass
class DataConfig:
    source: str = "pararel"  # pararel | known1000 | jsonl | counterfact | zsre | mquake | knowedit
    # folder (ParaRel), file or folder (Known 1000), file (jsonl, and the benchmarks: required); None: download + cache
    path: Optional[str] = None
    download: bool = True
    relations: Optional[list[str]] = None  # None: every relation
    facts_per_relation: Optional[int] = None  # edited facts per relation (None: all known facts)
    max_facts: Optional[int] = None  # edited facts in all (relations interleaved); None: no limit
    heldout_fraction: float = 0.3  # ParaRel: share of each relation's patterns held out for generalization
    heldout: str = "random"  # ParaRel: random (heldout_fraction of the patterns) | subject_first (those beginning with the subject)
    max_prompts: Optional[int] = None  # ParaRel: cap on edit prompts per fact (locating cost grows with them)
    only_known: bool = True  # the paper's way: edit only facts the model predicts correctly (top-1)
    known_min_share: float = 1.0  # "known": top-1 on at least this share of its edit prompts (1.0: all, as the KN editor wants)
    neighbours: int = 5  # facts of the same / of other relations measured for interference (the paper: 5)
    neighbour_prompts: int = 2  # prompts per neighbour fact
    check_chunk: int = 256  # facts per batched top-1 check
    known_cache: bool = True  # keep the top-1 check's results under $KN_EDIT_CACHE/known (one file per model weights)
    batch_size: int = 64  # prompts per forward pass
    seed: int = 0


@dataclass
class TextConfig:
    source: str = "wiki"  # wiki | file | none
    path: Optional[str] = None  # wiki: a summaries_en-us.json (None: fetch + cache); file: a UTF-8 text file
    passages: int = 16  # passages of the held-out slice
    max_tokens: int = 128  # each passage cut to this many tokens
    batch_size: int = 8


@dataclass
class EditorConfig:
    method: str = "kn"  # a registry name (kn_edit.editing.registry: kn, kn-paper, rome, ft, ...) or module:Class
    settings: dict[str, Any] = field(default_factory=dict)  # overrides of the method's settings (its config dataclass)


@dataclass
class ProbeConfig(LocateSettings):
    """Suppress/amplify probing; the locate settings apply only when the editor reports no neurons."""

    enabled: bool = True  # suppress/amplify change ratios with the random-neuron control
    factor: float = 2.0  # amplification factor (the paper: doubled)
    n_controls: int = 1  # random same-layer control sets per fact


@dataclass
class TrainerConfig:
    accelerator: str = "auto"
    devices: Any = 1
    strategy: str = "auto"
    num_nodes: int = 1


@dataclass
class RegressionConfig:
    baseline: Optional[str] = None  # metrics.json of a committed baseline run
    # metric name -> largest allowed change in the bad direction (absolute; see evaluation.regression)
    tolerances: dict[str, float] = field(default_factory=dict)


@dataclass
class FluencyConfig:
    """Generation fluency (Meng et al. 2022): after each edit, greedy continuations of short prompts that start
    with the subject; their n-gram entropy before and after (causal LMs)."""

    enabled: bool = True
    prompts: int = 2  # generations per edited fact
    max_new_tokens: int = 24
    samples: int = 2  # before/after samples shown in the report
    # edited facts whose generations run in one batch, each row carrying its fact's edit (the edits are reverted
    # first; an edit of a parameter no linear layer alone uses is generated on its own): decoding reads every
    # weight at every step, so a batch of edited models costs about one
    batch_facts: int = 16


@dataclass
class BenchmarkConfig:
    """The field's benchmarks (data.source counterfact | zsre | mquake | knowedit): their papers' metrics."""

    generation: bool = False  # also generation-based accuracy: greedy continuations of every probe prompt
    generation_extra_tokens: int = 3  # generated: the case's longest answer (tokens) + this many


class Mode(str, Enum):
    single = "single"  # each fact edited, measured and reverted on its own
    sequential = "sequential"  # edits applied one after another, measured at checkpoints, reverted at the end
    batch = "batch"  # every fact in one edit, each measured as a single edit is; compare: beside the single edits

    def __str__(self) -> str:
        return self.value


@dataclass
class RunConfig:
    """What an evaluation and a comparison of methods share: model, data, text, measuring, output."""

    name: str = "eval"
    mode: Mode = Mode.single
    checkpoints: list[int] = field(default_factory=lambda: [1, 10, 25, 50, 100])  # sequential: measure after n edits
    model: str = "smollm2-135m"
    data: DataConfig = field(default_factory=DataConfig)
    text: TextConfig = field(default_factory=TextConfig)
    fluency: FluencyConfig = field(default_factory=FluencyConfig)
    benchmark: BenchmarkConfig = field(default_factory=BenchmarkConfig)
    probe: ProbeConfig = field(default_factory=ProbeConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    regression: RegressionConfig = field(default_factory=RegressionConfig)
    output_dir: str = "runs"
    run_name: Optional[str] = None  # None: NAME-YYYYmmdd-HHMMSS
    verify_revert: bool = True  # after each revert, check the touched values are back bit for bit
    plots: bool = True

    def check(self):
        check_finite(self)  # done by load_config too; here for configs built in Python
        d = self.data
        if d.source not in ("pararel", "known1000", "jsonl", *BENCHMARKS):
            raise ConfigError(f"data.source must be pararel, known1000, jsonl, {', '.join(BENCHMARKS)}, got {d.source!r}")
        if d.heldout not in ("random", "subject_first"):
            raise ConfigError(f"data.heldout must be random or subject_first, got {d.heldout!r}")
        if d.heldout != "random" and d.source != "pararel":
            raise ConfigError("data.heldout=subject_first splits ParaRel's patterns; it needs data.source=pararel")
        if d.source == "jsonl" and not d.path:
            raise ConfigError("data.source=jsonl needs data.path (a JSONL fact file)")
        if d.source in BENCHMARKS and not d.path:
            raise ConfigError(f"data.source={d.source} needs data.path (the benchmark's file)")
        if d.source in BENCHMARKS and self.mode == Mode.sequential:
            raise ConfigError(f"data.source={d.source} is measured in mode single or batch, not sequential")
        if self.benchmark.generation_extra_tokens < 0:
            raise ConfigError("benchmark.generation_extra_tokens must be >= 0")
        for key in ("facts_per_relation", "max_facts", "max_prompts"):
            value = getattr(d, key)
            if value is not None and value < 1:
                raise ConfigError(f"data.{key} must be at least 1 (or null), got {value}")
        if not 0.0 < d.known_min_share <= 1.0:
            raise ConfigError(f"data.known_min_share must be in (0, 1], got {d.known_min_share}")
        if d.neighbours < 0 or d.neighbour_prompts < 1 or d.check_chunk < 1 or d.batch_size < 1:
            raise ConfigError("data.neighbours >= 0, data.neighbour_prompts, data.check_chunk and data.batch_size >= 1")
        if self.text.source not in ("wiki", "file", "none"):
            raise ConfigError(f"text.source must be wiki, file or none, got {self.text.source!r}")
        if self.text.source == "file" and not self.text.path:
            raise ConfigError("text.source=file needs text.path")
        if self.text.passages < 1 or self.text.max_tokens < 2 or self.text.batch_size < 1:
            raise ConfigError("text.passages >= 1, text.max_tokens >= 2, text.batch_size >= 1")
        self.probe.check_locate()
        if self.probe.n_controls < 1:
            raise ConfigError(f"probe.n_controls must be at least 1, got {self.probe.n_controls}")
        if not self.checkpoints or min(self.checkpoints) < 1:
            raise ConfigError(f"checkpoints must be edit counts >= 1, got {list(self.checkpoints)}")
        f = self.fluency
        if f.prompts < 1 or f.max_new_tokens < 2 or f.samples < 0 or f.batch_facts < 1:
            raise ConfigError("fluency.prompts >= 1, fluency.max_new_tokens >= 2, fluency.samples >= 0, "
                              "fluency.batch_facts >= 1")
        return self


@dataclass
class EvalConfig(RunConfig):
    """One editor over a fact set (``configs/eval/*.yaml``)."""

    editor: EditorConfig = field(default_factory=EditorConfig)

    def check(self) -> "EvalConfig":
        super().check()
        _check_method(self.editor.method, self.editor.settings, "editor")
        return self


def _check_method(method: str, settings: dict, where: str) -> None:
    """The method's own settings checked now (unknown keys, ranges, NaN), before any model is loaded."""
    from ..editing.registry import method_config

    try:
        method_config(method, overrides=dict(settings))
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}") from exc


@dataclass
class MethodEntry:
    method: str = "kn"  # registry name or module:Class
    label: Optional[str] = None  # its name in the report (default: method)
    settings: dict[str, Any] = field(default_factory=dict)

    @property
    def title(self) -> str:
        return self.label or self.method


@dataclass
class CompareConfig(RunConfig):
    """Several editors on the same edit requests (``configs/compare/*.yaml``); regression tolerances are keyed
    ``label:metric`` (e.g. ``rome:edit/top1``)."""

    name: str = "compare"
    methods: list[MethodEntry] = field(default_factory=lambda: [MethodEntry("kn"), MethodEntry("rome"), MethodEntry("ft")])
    # Each finished method is kept in OUTPUT_DIR/.NAME.parts; resume=true reuses those made with the very same
    # settings, model, cases and text (a stopped comparison, or runs of a few methods each joined into one).
    resume: bool = False
    # mode=batch: which ways each method is measured ("batch": the N facts in one edit; "single": one edit per
    # fact). A sweep of batch-only settings (MEMIT's λ) lists ["batch"] and skips N single edits per entry.
    batch_ways: list[str] = field(default_factory=lambda: ["batch", "single"])

    def check(self) -> "CompareConfig":
        super().check()
        if not self.methods:
            raise ConfigError("methods: list at least one editing method")
        ways = [str(w) for w in self.batch_ways]
        if not ways or len(set(ways)) != len(ways) or not set(ways) <= {"batch", "single"}:
            raise ConfigError(f"batch_ways: a list of 'batch' and/or 'single', each once, got {ways}")
        if self.mode != Mode.batch and ways != ["batch", "single"]:  # it would be ignored: say so instead
            raise ConfigError(f"batch_ways applies to mode=batch only (mode is {Mode(self.mode).value}); "
                              "leave it out or set mode=batch")
        titles = [m.title for m in self.methods]
        if len(set(titles)) != len(titles):
            raise ConfigError(f"methods: labels must differ, got {titles} (set label: for repeated methods)")
        for i, m in enumerate(self.methods):
            _check_method(m.method, m.settings, f"methods[{i}] ({m.title})")
        return self
