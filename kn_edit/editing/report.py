"""The typed report every editor fills the same way: which parameters it changed, how long it took, peak
memory, and per prompt whether the edit holds. Method-specific details sit in ``details`` (a dataclass of the
method's own). The CLI tables, the evaluation and patch files read only this.

Per-prompt outcomes are measured by one function for every method (:func:`prompt_outcomes`), so "success"
means the same everywhere: for an update, the new object is the greedy continuation of every edit prompt,
every token of it (teacher-forced); for an erasure, the erased object is no longer the top prediction at its
first token. The margin is the logit gap behind that verdict (> 0 iff it holds).
"""

from __future__ import annotations

import dataclasses
import enum
import resource
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Iterator, Sequence

import torch

from ..models.neurons import Neuron

if TYPE_CHECKING:
    from ..models.model import KnModel


@dataclass(frozen=True)
class PromptOutcome:
    """One edit prompt after the edit. target: the new object (update) or the erased one (erasure)."""

    prompt: str
    target: str
    erasure: bool
    success: bool
    margin: float  # update: min over new's tokens of logit(new) - best other; erasure: best other - logit(old)


@dataclass(frozen=True)
class ParameterChange:
    """A parameter the edit changed: ``slices`` rows along ``dim`` out of ``size`` (whole: slices == size)."""

    name: str
    dim: int
    slices: int
    size: int
    elements: int

    @property
    def whole(self) -> bool:
        return self.slices == self.size


@dataclass
class EditReport:
    """What an edit did, in the same shape for every method."""

    method: str  # the registry name (or the editor class's name)
    prompts: list[PromptOutcome] = field(default_factory=list)
    parameters: list[ParameterChange] = field(default_factory=list)
    seconds: float = 0.0
    peak_memory_mb: float | None = None
    memory_kind: str = ""  # "cuda allocated" (peak during the edit) or "process peak RSS" (CPU, high-water mark)
    neurons: list[Neuron] = field(default_factory=list)  # the knowledge neurons the edit worked on, if any
    details: Any = None  # the method's own dataclass (e.g. KnUpdateDetails, RomeDetails)
    # wall seconds per phase of the edit (PhaseTimer), in the order first entered, then "other": the rest of seconds
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def success(self) -> bool:
        """Every request's prompts hold (no prompts: nothing to judge, so False)."""
        return bool(self.prompts) and all(p.success for p in self.prompts)

    @property
    def prompt_success(self) -> float:
        return sum(p.success for p in self.prompts) / len(self.prompts) if self.prompts else 0.0

    def to_dict(self) -> dict:
        """JSON-friendly: dataclasses as dicts, Enums as their values, tensors as lists."""
        out = {
            "method": self.method,
            "success": self.success,
            "seconds": self.seconds,
            "timings": dict(self.timings),
            "peak_memory_mb": self.peak_memory_mb,
            "memory_kind": self.memory_kind,
            "prompts": [dataclasses.asdict(p) for p in self.prompts],
            "parameters": [dataclasses.asdict(p) for p in self.parameters],
            "neurons": [[n.layer, n.index] for n in self.neurons],
            "details": _plain(self.details),
        }
        return out


def format_timings(seconds: float, timings: dict[str, float]) -> str:
    """One line: "8.1 s (locate 4.2, solve 2.0, guard 1.1, other 0.8)", leaving out phases under 1 % of it."""
    short = lambda x: f"{x:.1f}" if x >= 0.95 else f"{x:.2g}"  # noqa: E731  (tiny models: 0.013 s, not 0.0)
    shown = [f"{phase} {short(value)}" for phase, value in timings.items() if value > 0 and value >= 0.01 * seconds]
    return f"{short(seconds)} s" + (f" ({', '.join(shown)})" if shown else "")


def _plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, torch.Tensor):
        return value.tolist() if value.numel() <= 64 else f"tensor{list(value.shape)}"
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)


def prompt_outcomes(km: KnModel, requests: Sequence) -> list[PromptOutcome]:
    """Every request's prompts, judged on the model as it is now (see the module docstring)."""
    from .targets import margins

    steps, owners, meta = [], [], []
    for request in requests:
        target = request.old if request.is_erasure else request.new
        for prompt in request.prompts:
            enc = km.encode(prompt, target).steps
            use = enc[:1] if request.is_erasure else enc
            for step in use:
                steps.append(step)
                owners.append(len(meta))
            meta.append((prompt, target, request.is_erasure))
    if not steps:
        return []
    m = margins(km, steps)
    out = []
    for j, (prompt, target, erasure) in enumerate(meta):
        mine = m[[i for i, o in enumerate(owners) if o == j]]
        margin = float(-mine.max()) if erasure else float(mine.min())
        out.append(PromptOutcome(prompt, target, erasure, margin > 0, margin))
    return out


def request_successes(requests: Sequence, outcomes: Sequence[PromptOutcome]) -> list[bool]:
    """Per request, whether all its prompts succeeded, from :func:`prompt_outcomes`' list (request by request)."""
    found, start = [], 0
    for request in requests:
        found.append(all(o.success for o in outcomes[start : start + len(request.prompts)]))
        start += len(request.prompts)
    return found


def parameter_changes(km: KnModel, patches) -> list[ParameterChange]:
    out = []
    for p in patches:
        param = km.model.get_parameter(p.name)
        out.append(ParameterChange(p.name, p.dim, int(p.index.numel()), int(param.shape[p.dim]), int(p.after.numel())))
    return out


class PhaseTimer:
    """Wall seconds per named phase of one edit (``EditReport.timings``): ``with timer("solve"):`` charges the
    block to "solve"; a phase entered again adds up. A phase entered inside another is charged to the inner one
    alone (the outer one pauses meanwhile), so no second is counted twice and the phases add up to at most the
    edit's seconds. On CUDA each boundary synchronizes, so kernels still queued are charged to their phase."""

    def __init__(self, device: torch.device | None = None) -> None:
        self.seconds: dict[str, float] = {}
        self._open: list[list] = []  # [phase, running since] of the phases entered and not yet left, innermost last
        self._cuda = device if device is not None and device.type == "cuda" and torch.cuda.is_available() else None

    @contextmanager
    def __call__(self, phase: str) -> Iterator[None]:
        self._open.append([phase, self._charge()])  # the enclosing phase, if any, pauses
        try:
            yield
        finally:
            now = self._charge()
            self._open.pop()
            if self._open:  # the enclosing phase resumes
                self._open[-1][1] = now

    def _charge(self) -> float:
        """Charge the innermost open phase with the time since it last (re)started; returns now."""
        if self._cuda is not None:
            torch.cuda.synchronize(self._cuda)
        now = time.perf_counter()
        if self._open:
            phase, since = self._open[-1]
            self.seconds[phase] = self.seconds.get(phase, 0.0) + now - since
        return now

    def timings(self, total: float) -> dict[str, float]:
        """The phases in the order first entered, then "other": what ``total`` has beyond them (at least 0)."""
        return dict(self.seconds) | {"other": max(0.0, total - sum(self.seconds.values()))}


class _Measure:
    seconds: float = 0.0
    peak_memory_mb: float | None = None
    memory_kind: str = ""


@contextmanager
def measured(device: torch.device) -> Iterator[_Measure]:
    """Wall seconds and peak memory of the block: the CUDA allocator's peak during it, or on CPU the
    process's peak resident memory so far (a high-water mark: it includes what ran before)."""
    result = _Measure()
    cuda = device.type == "cuda" and torch.cuda.is_available()
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    yield result
    if cuda:
        torch.cuda.synchronize(device)
        result.peak_memory_mb = torch.cuda.max_memory_allocated(device) / 2**20
        result.memory_kind = "cuda allocated"
    else:
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
        result.peak_memory_mb = rss / (2**20 if sys.platform == "darwin" else 2**10)
        result.memory_kind = "process peak RSS"
    result.seconds = time.perf_counter() - start
