"""The evaluation LightningModule: its test loop edits each fact through the Editor interface, measures,
and reverts, so any editor runs on one CPU or under Lightning's distributed strategies.

Per fact (one batch = one EditCase): score every prompt before the edit (edit prompts with old and new
object, held-out paraphrases, interference facts with their gold object) in one batched pass; apply the
edit (with gradients enabled: editors may attribute); score again and measure held-out text perplexity;
revert, and check that the touched values are back bit for bit; then, with the model restored, probe the
fact's knowledge neurons (suppress/amplify, random same-layer control). An editor that raises a KnEditError
for a fact leaves the model unchanged: the fact counts as a failed edit (after = before) and is reported.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Sequence

import pytorch_lightning as pl
import torch
from torchmetrics import MaxMetric, MeanMetric, SumMetric

from ..data.records import FactRecord
from ..editing.base import Edit, Editor
from ..editing.ledger import weights_state
from ..errors import ConfigError, EditError, KnEditError
from ..models.likelihood import text_nll, tokenized_text
from ..models.replay import KeptPasses, keeping, lowest_block, replaying
from ..models.row_changes import RowChange, row_change_plan
from . import functional as Fn
from .benchmark import generate, measure
from .benchmark_metrics import case_scores, groups_of, idf_weights, summary as benchmark_summary
from .config import BenchmarkConfig, FluencyConfig, ProbeConfig
from .datamodule import EditCase
from .fluency import greedy_generations, greedy_generations_changed, grouped_generations, ngram_entropy
from .metrics import EditSuccess, GroupedMean, PerplexityDrift, Retention

if TYPE_CHECKING:
    from ..models.model import KnModel

PROBE_CONDITIONS = ("suppressed", "amplified", "control_suppressed", "control_amplified")
# Generation prompts for the fluency measure: the subject, then a short neutral start.
GENERATION_TEMPLATES = ("{}", "{} is", "{} was", "The story of {}")


def score_pairs(km: KnModel, pairs: Sequence[tuple[str, str]], batch_size: int = 64) -> tuple[torch.Tensor,
                torch.Tensor]:
    """(log P(target) [n], target top-1 [n], every teacher-forced token) of (prompt, target) pairs, batched."""
    steps, owner = [], []
    for i, (prompt, target) in enumerate(pairs):
        for step in km.encode(prompt, target).steps:
            steps.append(step)
            owner.append(i)
    logits = km.step_logits(steps, batch_size=batch_size)
    targets = torch.tensor([s.target_id for s in steps], device=logits.device)
    return Fn.answer_scores(logits, targets, torch.tensor(owner, device=logits.device), len(pairs))






@torch.no_grad()
def parameter_sums(km: KnModel) -> dict[str, float]:
    """A float64 sum per parameter: a cheap fingerprint to notice changes an editor did not declare."""
    return {name: float(p.detach().double().sum()) for name, p in km.model.named_parameters()}


def check_reverted(km: KnModel, edit: Edit) -> None:
    """Every patched slice holds its ``before`` values again, bit for bit."""
    for patch in edit.patches:
        param = km.model.get_parameter(patch.name).detach()
        now = param.index_select(patch.dim, patch.index.to(param.device)).cpu()
        if not torch.equal(now, patch.before.to(now.dtype)):
            raise EditError(f"{edit.editor}: revert() left {patch.name} changed")


# The weight changes waiting facts hold for their batched generation (float32 deltas) stay under this: a change
# larger than it (a dense fine-tuning edit of a large model) is generated at once, with the edit applied.
_WAITING_BYTES = 256 * 1024**2
# The unedited held-out text pass keeps every block's output within this much memory, so each edit's pass runs
# from the lowest block it touches (16 passages × 96 tokens on smollm2-135m: ~110 MB in float32).
_TEXT_REPLAY_BYTES = 512 * 1024**2


@dataclass(frozen=True)
class _KeptText:
    """The unedited model's held-out text NLL (summed NLL, tokens), its passes' block outputs, and the weights'
    state they were measured in."""

    nll: tuple[torch.Tensor, torch.Tensor]
    passes: KeptPasses
    state: object


def plan_bytes(plan) -> int:
    return sum(change.delta.numel() * change.delta.element_size() for _, _, change in plan)


@dataclass(frozen=True)
class EditSummary:
    """What a row needs of a reverted edit (not its before/after copies, which can be large)."""

    editor: str
    report: object
    touched_parameters: list[str]

    @classmethod
    def of(cls, edit: Edit | None) -> "EditSummary | None":
        return None if edit is None else cls(edit.editor, edit.report, edit.touched_parameters)


def change_plan(km: KnModel, edit: Edit):
    """The edit's net change as rows of a batch can carry it (kn_edit.models.row_changes); None where they cannot."""
    def wide(t: torch.Tensor) -> torch.Tensor:  # half precision would round the difference
        return t.to(torch.promote_types(t.dtype, torch.float32))

    return row_change_plan(km, [RowChange(p.name, p.dim, p.index, wide(p.after) - wide(p.before)) for p in edit.patches])


@dataclass
class _Measured:
    """One fact's measurements while its after-edit generations wait for the next batch (``plan``: the edit's
    change as rows carry it; None: generated already or not at all)."""

    case: EditCase
    at: dict
    before: tuple
    after: tuple | None
    edit: EditSummary | None
    error: str | None
    bench_before: object
    bench_after: object
    gen_prompts: list[str]
    plan: list | None
    probed: dict = field(default_factory=dict)


def subject_first(prompt: str, subject: str) -> bool:
    """Whether ``prompt`` begins with ``subject`` (ignoring case and leading space)."""
    return prompt.lstrip().lower().startswith(subject.strip().lower())


class EditEvaluation(pl.LightningModule):
    """Evaluate ``editor`` on the cases of a FactDataModule. ``passages``: held-out text for perplexity drift
    (causal LMs; empty: not measured). Results land in ``self.results`` after ``trainer.test``."""

    def __init__(
        self,
        km: KnModel,
        editor: Editor,
        passages: Sequence[str] = (),
        probe: ProbeConfig | None = None,
        fluency: FluencyConfig | None = None,
        max_text_tokens: int = 128,
        text_batch_size: int = 8,
        batch_size: int = 64,
        verify_revert: bool = True,
        before_cache: dict | None = None,
        benchmark: BenchmarkConfig | None = None,
    ) -> None:
        super().__init__()
        self.km = km
        self.net = km.model  # registered so Lightning moves it to the process's device
        self.editor = editor
        self.passages = list(passages) if not km.is_masked_lm else []
        self.probe_config = probe or ProbeConfig()
        self.fluency_config = fluency or FluencyConfig(enabled=False)
        self.fluency_on = self.fluency_config.enabled and not km.is_masked_lm
        self.max_text_tokens = max_text_tokens
        self.text_batch_size = text_batch_size
        self.batch_size = batch_size
        self.verify_revert = verify_revert
        # What the unedited model gives (scores, generations, text NLL) does not depend on the editor: a
        # comparison passes one dict to every method's evaluation, so it is measured once per case.
        self.before_cache = before_cache
        self._kept: dict = {}  # the same, for this evaluation alone, where no dict is shared
        self._waiting: list[_Measured] = []
        self.benchmark_config = benchmark or BenchmarkConfig()
        self.generation_on = self.benchmark_config.generation and not km.is_masked_lm
        self._idf: dict[str, float] = {}
        self.edit_metric = EditSuccess()
        self.generalization = EditSuccess()
        # the held-out paraphrases split by whether the prompt begins with the subject (there, on a model without a
        # BOS token, the subject's last token can be the first position, whose key no prefixed key covers)
        self.held_first = EditSuccess()
        self.held_inside = EditSuccess()
        self.intra = Retention()
        self.intra_same = Retention()  # same-relation facts whose object is the edited fact's old object
        self.intra_other = Retention()  # ... and those with another object
        self.inter = Retention()
        self.seconds = MeanMetric()
        self.peak_memory = MaxMetric()
        self.entropy_before = MeanMetric()  # generation fluency (n-gram entropy), per edited fact
        self.entropy_after = MeanMetric()
        self.drift = PerplexityDrift()
        self.edit_errors = SumMetric()
        self.probed = SumMetric()
        self.relations: list[str] = []
        self.rows: list[dict] = []
        self.results: dict = {}

    # ----- setup ------------------------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        datamodule = getattr(self.trainer, "datamodule", None)
        self.relations = list(getattr(datamodule, "relations", []) or ["all"])
        # One change-ratio metric per condition, with a slot per relation.
        self.probe_metrics = torch.nn.ModuleDict({c: GroupedMean(len(self.relations)) for c in PROBE_CONDITIONS})
        # CounterFact's reference score: TF-IDF with document frequencies over every case's reference texts
        # (ROME fits it on Wikipedia; the reference texts are what this run has about the new objects).
        cases = getattr(datamodule, "cases", None) or []
        self._idf = idf_weights([t for c in cases if c.benchmark is not None for t in c.benchmark.reference_texts])

    def on_test_start(self) -> None:
        self.rows = []
        self._sums = parameter_sums(self.km) if self.verify_revert else None
        self._text = tokenized_text(self.km, self.passages, self.max_text_tokens)
        kept = self._before("text", lambda: self._kept_text_nll() if self._text else None)
        self._text_before, self._text_kept = (kept.nll, kept) if kept is not None else (None, None)
        self._waiting = []
        if self.fluency_on:
            datamodule = getattr(self.trainer, "datamodule", None)
            self._generate_before(list(getattr(datamodule, "local_cases", None) or []))

    @property
    def _store(self) -> dict:
        """Where the unedited model's measurements are kept: the comparison's shared dict, else this evaluation's."""
        return self.before_cache if self.before_cache is not None else self._kept

    def _before(self, key, measure):
        """``measure()`` on the unedited model, once per key (shared by a comparison's methods through
        ``before_cache``)."""
        if key not in self._store:
            self._store[key] = measure()
        return self._store[key]

    def _generate_before(self, cases: Sequence[EditCase]) -> None:
        """Every case's generations on the unedited model, in batches (decoding costs per step, not per row)."""
        todo = {self._generation_key(c): self._generation_prompts(c) for c in cases}
        todo = {k: p for k, p in todo.items() if k not in self._store}
        self._store.update(zip(todo, self._generate_groups(list(todo.values()))))

    @staticmethod
    def _generation_key(case: EditCase) -> tuple:
        return ("generations", case.index, case.fact.fact_id, case.fact.subject)

    def _generate(self, prompts: Sequence[str]):
        return greedy_generations(self.km, list(prompts), self.fluency_config.max_new_tokens,
                                  batch_size=self.batch_size) if prompts else []

    def _generate_groups(self, groups: Sequence[Sequence[str]]):
        return grouped_generations(self.km, groups, self.fluency_config.max_new_tokens, batch_size=self.batch_size)

    # ----- measuring --------------------------------------------------------------------------------
    def _score(self, pairs: Sequence[tuple[str, str]]) -> tuple[torch.Tensor, torch.Tensor]:
        return score_pairs(self.km, pairs, self.batch_size)

    def _text_nll(self, edit: Edit | None = None, base=None) -> tuple[torch.Tensor, torch.Tensor]:
        """(summed NLL, tokens) of the held-out text. With ``edit`` applied on weights in state ``base``
        (weights_state before it) that the unedited pass was kept for, the blocks below the lowest one the edit
        touches hand back that pass's outputs: the same numbers, bit for bit, computed from that block on."""
        kept = self._text_kept
        if edit is None or kept is None or base is None or kept.state != base:
            return text_nll(self.km, self._text, self.text_batch_size)
        with replaying(self.km, kept.passes, lowest_block(self.km, edit.touched_parameters)):
            return text_nll(self.km, self._text, self.text_batch_size)

    def _kept_text_nll(self) -> "_KeptText":
        """The unedited text NLL, every block's output kept (within _TEXT_REPLAY_BYTES) for the edits' passes."""
        state = weights_state(self.km)
        with keeping(self.km, _TEXT_REPLAY_BYTES) as passes:
            nll = text_nll(self.km, self._text, self.text_batch_size)
        return _KeptText(nll, passes, state)

    @staticmethod
    def _pairs(case: EditCase) -> tuple[list[tuple[str, str]], dict[str, slice]]:
        fact, new = case.fact, case.new
        parts = {
            "edit_old": [(p, fact.object) for p in fact.prompts],
            "edit_new": [(p, new) for p in fact.prompts],
            "held_old": [(p, fact.object) for p in fact.heldout_prompts],
            "held_new": [(p, new) for p in fact.heldout_prompts],
            "intra_same": [(p, r.object) for r in case.same_relation if r.object == fact.object for p in r.all_prompts],
            "intra_other": [(p, r.object) for r in case.same_relation if r.object != fact.object for p in r.all_prompts],
            "inter": [(p, r.object) for r in case.other_relation for p in r.all_prompts],
        }
        pairs, where = [], {}
        for name, items in parts.items():
            where[name] = slice(len(pairs), len(pairs) + len(items))
            pairs += items
        return pairs, where

    def _neurons(self, edit: Edit | None, fact: FactRecord):
        """The fact's knowledge neurons: those the edit's report names, else located with the probe settings
        (editors such as ROME work on no neurons)."""
        if edit is not None and edit.report is not None and edit.report.neurons:
            return list(edit.report.neurons)
        from ..locating.locate import locate

        cfg = self.probe_config
        with torch.enable_grad():
            return locate(self.km, fact.prompts, fact.object, cfg.threshold, cfg.share, cfg.steps, cfg.layers)

    def _probe(self, case: EditCase, edit: Edit | None, row: dict) -> None:
        from ..locating.probe import probe

        try:
            neurons = self._neurons(edit, case.fact)
        except KnEditError as exc:
            row["probe_error"] = str(exc)
            return
        if not neurons:
            row["probe_error"] = "no knowledge neurons"
            return
        self.probed.update(torch.tensor(1.0, device=self.device))
        cfg = self.probe_config
        seed = zlib.crc32(case.fact.fact_id.encode())
        result = probe(self.km, list(case.fact.all_prompts), case.fact.object, neurons, cfg.n_controls, seed, cfg.factor)
        means = result.mean_ratios()
        group = torch.tensor([case.relation_index], device=self.device)
        for condition in PROBE_CONDITIONS:
            self.probe_metrics[condition].update(torch.tensor([means[condition]], device=self.device), group)
        row["probe"] = {"neurons": [str(n) for n in neurons], **{k: float(v) for k, v in means.items()}}

    # ----- the loop ---------------------------------------------------------------------------------
    def test_step(self, case: EditCase, batch_idx: int) -> None:
        pairs, at = self._pairs(case)
        gen_prompts = self._generation_prompts(case) if self.fluency_on else []
        before = self._case_before(case, pairs, gen_prompts)
        bench_before = self._benchmark_before(case)
        base = weights_state(self.km)
        edit, error = self._apply_edit(case.requests)
        after = bench_after = plan = None
        if edit is not None:
            try:
                after = self._after(pairs, gen_prompts, generate=False, edit=edit, base=base)
                plan = change_plan(self.km, edit) if gen_prompts else None
                if plan is not None and plan_bytes(plan) > _WAITING_BYTES:
                    plan = None
                if gen_prompts and plan is None:  # rows cannot carry this change: generated now, edit in place
                    after = (*after[:3], self._generate(gen_prompts))
                bench_after = self._benchmark_measure(case)
            finally:
                edit.revert()
            if self.verify_revert:
                check_reverted(self.km, edit)
        measured = _Measured(case, at, before, after, EditSummary.of(edit), error, bench_before, bench_after,
                             gen_prompts, plan)
        if self.probe_config.enabled:
            self.probed.update(torch.tensor(0.0, device=self.device))  # so every process has a state to reduce
            self._probe(case, edit, measured.probed)
        self._waiting.append(measured)
        held = sum(plan_bytes(m.plan) for m in self._waiting if m.plan is not None)
        if len(self._waiting) >= self.fluency_config.batch_facts or held > _WAITING_BYTES:
            self._record_waiting()

    def _record_waiting(self) -> None:
        """The waiting facts' after-edit generations in one batch (each row carrying its fact's edit), then
        their rows and metrics, in the order the facts were measured."""
        waiting, self._waiting = self._waiting, []
        carried = [m for m in waiting if m.plan is not None]
        made = greedy_generations_changed(self.km, [m.gen_prompts for m in carried], [m.plan for m in carried],
                                          self.fluency_config.max_new_tokens) if carried else []  # fmt: skip
        for m, generations in zip(carried, made):
            m.after = (*m.after[:3], generations)
        for m in waiting:
            row = self._record(m.case, m.at, m.before, m.after, m.edit, m.error)
            self._benchmark_row(m.case, row, m.bench_before, m.bench_after, (m.after or m.before)[-1])
            row.update(m.probed)
            self.rows.append(row)

    def _case_before(self, case: EditCase, pairs, gen_prompts: list[str]):
        """(log P, top-1, generations) of the case's prompts on the unedited model (shared through ``_before``;
        the generations made in batches by ``_generate_before``)."""
        scores = self._before(("case", case.index, case.fact.fact_id, case.new), lambda: self._score(pairs))
        generations = self._before(self._generation_key(case), lambda: self._generate(gen_prompts)) if gen_prompts else []
        return (*scores, generations)

    def _benchmark_measure(self, case: EditCase):
        """(teacher-forced measures, greedy continuations or None) of a benchmark case's groups; None for others."""
        if case.benchmark is None:
            return None
        groups = groups_of(case.benchmark)
        measured = measure(self.km, groups, self.batch_size)
        extra = self.benchmark_config.generation_extra_tokens
        return measured, generate(self.km, groups, measured, extra) if self.generation_on else None

    def _benchmark_before(self, case: EditCase):
        return self._before(("benchmark", case.index, case.fact.fact_id), lambda: self._benchmark_measure(case))

    def _benchmark_row(self, case: EditCase, row: dict, before, after, generations) -> None:
        """The benchmark's metrics of the case into its row (``after`` None: the edit was refused, after = before).
        ``generations``: the fluency generations after the edit (from the case's generation prompts: GE, RS)."""
        if before is None:
            return
        after = after or before
        bench = case.benchmark
        texts = [g.text for g in generations] if self.fluency_on and bench.generation_prompts else ()
        scores = case_scores(bench.source, groups_of(bench), before[0], after[0], texts, bench.reference_texts,
                             self._idf, before[1], after[1])  # fmt: skip
        row["benchmark"] = {"source": bench.source, "case_id": bench.case_id, "scores": scores}

    def _apply_edit(self, requests) -> tuple[Edit | None, str | None]:
        """(the edit, None), or (None, the reason) when the editor refused (the model is then unchanged)."""
        try:
            with torch.enable_grad():
                return self.editor.apply(self.km, list(requests)), None
        except KnEditError as exc:
            return None, f"{type(exc).__name__}: {exc}"

    def _after(self, pairs, gen_prompts: list[str], text_after=None, generate: bool = True, edit: Edit | None = None,
               base=None):
        """(log P, top-1, text NLL, generations) with ``edit`` in place, applied on weights in state ``base``
        (``text_after``: already measured; ``generate`` False: generations None, made later)."""
        logp_after, top1_after = self._score(pairs)
        if text_after is None and self._text:
            text_after = self._text_nll(edit, base)
        gen_after = self._generate(gen_prompts) if generate else None
        return logp_after, top1_after, text_after, gen_after

    def _record(self, case: EditCase, at: dict[str, slice], before, after, edit: Edit | EditSummary | None,
                error: str | None, timed: bool = True) -> dict:
        """Update the metrics with one fact's measurements and return its row. ``after`` None: the editor
        refused, the model is unchanged (after = before), the fact counts as a failed edit. ``timed``: the edit's
        seconds, memory and report count here (a batch edit counts them at its first fact only)."""
        logp_before, top1_before, gen_before = before
        if after is None:
            logp_after, top1_after, text_after, gen_after = logp_before, top1_before, self._text_before, gen_before
        else:
            logp_after, top1_after, text_after, gen_after = after
        self.edit_errors.update(torch.tensor(float(edit is None), device=self.device))
        if timed and edit is not None and edit.report is not None:
            self.seconds.update(torch.tensor(edit.report.seconds, device=self.device))
            if edit.report.peak_memory_mb is not None:
                self.peak_memory.update(torch.tensor(edit.report.peak_memory_mb, device=self.device))

        row = self._row(case, edit, error, with_report=timed)
        for name, metric in (("edit", self.edit_metric), ("held", self.generalization)):
            old, new = at[f"{name}_old"], at[f"{name}_new"]
            args = (top1_after[new], logp_after[new], logp_after[old], logp_before[new])
            metric.update(*args)
            if len(args[0]):
                row["edit" if name == "edit" else "generalization"] = {
                    k: float(v) for k, v in Fn.edit_success(*args).items()
                } | {"p_new_before": float(logp_before[new].exp().mean()), "p_new_after": float(logp_after[new].exp().mean()),
                     "p_old_before": float(logp_before[old].exp().mean()), "p_old_after": float(logp_after[old].exp().mean())}  # fmt: skip
        self._record_subject_first(case, at, top1_after, logp_after, logp_before, row)
        # intra: every same-relation fact (the two slices are adjacent), and split by object
        at["intra"] = slice(at["intra_same"].start, at["intra_other"].stop)
        for name, metric in (("intra", self.intra), ("intra_same", self.intra_same), ("intra_other", self.intra_other),
                             ("inter", self.inter)):  # fmt: skip
            s = at[name]
            if s.stop > s.start:
                args = (top1_before[s], top1_after[s], logp_before[s], logp_after[s])
                metric.update(*args)
                counts = Fn.retention_counts(*args)
                row[name] = {k: float(v) for k, v in counts.items()}
        if text_after is not None:
            self.drift.update(*self._text_before, *text_after)
            ppl_before = Fn.perplexity(*self._text_before)
            row["text_ppl"] = {"before": float(ppl_before), "after": float(Fn.perplexity(*text_after))}
        if self.fluency_on:  # (then the case has generation prompts)
            entropy_before = ngram_entropy([g.text for g in gen_before])
            entropy_after = ngram_entropy([g.text for g in gen_after])
            self.entropy_before.update(torch.tensor(entropy_before, device=self.device))
            self.entropy_after.update(torch.tensor(entropy_after, device=self.device))
            row["fluency"] = {"entropy_before": entropy_before, "entropy_after": entropy_after, "samples": [
                {"prompt": b.prompt, "before": b.text, "after": a.text}
                for b, a in list(zip(gen_before, gen_after))[: self.fluency_config.samples]]}
        return row

    def _record_subject_first(self, case: EditCase, at: dict[str, slice], top1_after, logp_after, logp_before,
                              row: dict) -> None:
        """Generalization split by whether a held-out paraphrase begins with the subject (``subject_first``)."""
        first = torch.tensor([subject_first(p, case.fact.subject) for p in case.fact.heldout_prompts], dtype=torch.bool,
                             device=top1_after.device)
        old, new = at["held_old"], at["held_new"]
        for part, mask, metric in (("first", first, self.held_first), ("inside", ~first, self.held_inside)):
            args = (top1_after[new][mask], logp_after[new][mask], logp_after[old][mask], logp_before[new][mask])
            metric.update(*args)
            if len(args[0]) and "generalization" in row:
                row["generalization"][f"top1_subject_{part}"] = float(args[0].float().mean())
        if "generalization" in row:
            row["generalization"]["n_subject_first"] = int(first.sum())

    def _generation_prompts(self, case: EditCase) -> list[str]:
        """Short prompts that start with the subject (Meng et al. generate from the subject); a benchmark case's
        own generation prompts where it has them."""
        if case.benchmark is not None and case.benchmark.generation_prompts:
            return list(case.benchmark.generation_prompts[: self.fluency_config.prompts])
        subject = case.fact.subject
        return [t.format(subject) for t in GENERATION_TEMPLATES][: self.fluency_config.prompts]

    def _row(self, case: EditCase, edit: Edit | EditSummary | None, error: str | None, with_report: bool = True) -> dict:
        fact = case.fact
        row = {
            "index": case.index,
            "fact_id": fact.fact_id,
            "relation": fact.relation,
            "subject": fact.subject,
            "old": fact.object,
            "new": case.new,
            "n_edit_prompts": len(fact.prompts),
            "n_heldout_prompts": len(fact.heldout_prompts),
        }
        if error is not None:
            row["error"] = error
        if edit is not None:
            row["editor"] = {"name": edit.editor, "touched": edit.touched_parameters,
                             "report": edit.report.to_dict() if edit.report is not None and with_report else None}
        return row

    def on_test_end(self) -> None:
        if self._sums is not None:
            now = parameter_sums(self.km)
            changed = [k for k, v in self._sums.items() if now[k] != v]
            if changed:
                raise EditError(f"{self.editor.name}: the model is not as before the run; changed: {changed[:5]}")

    def on_test_epoch_end(self) -> None:
        self._record_waiting()
        metrics: dict[str, float] = {}
        for prefix, metric in (("edit", self.edit_metric), ("generalization", self.generalization),
                               ("intra", self.intra), ("intra_same", self.intra_same),
                               ("intra_other", self.intra_other), ("inter", self.inter)):  # fmt: skip
            metrics |= {f"{prefix}/{k}": float(v) for k, v in metric.compute().items()}
        for part, metric in (("first", self.held_first), ("inside", self.held_inside)):
            metrics[f"generalization/top1_subject_{part}"] = float(metric.compute()["top1"])
        metrics["edit/seconds"] = float(self.seconds.compute())
        if self.fluency_on:
            metrics["fluency/entropy_before"] = float(self.entropy_before.compute())
            metrics["fluency/entropy_after"] = float(self.entropy_after.compute())
            metrics["fluency/entropy_change"] = metrics["fluency/entropy_after"] - metrics["fluency/entropy_before"]
        metrics["run/peak_memory_mb"] = float(self.peak_memory.compute())
        if self._text:
            metrics |= {f"drift/{k}": float(v) for k, v in self.drift.compute().items()}
        metrics["run/edit_errors"] = float(self.edit_errors.compute())
        per_relation: dict[str, dict[str, float]] = {}
        if self.probe_config.enabled:
            metrics["probe/facts"] = float(self.probed.compute())
            for condition, metric in self.probe_metrics.items():
                values = metric.compute().reshape(-1).tolist()  # torchmetrics squeezes a single group
                finite = [v for v in values if not math.isnan(v)]
                metrics[f"probe/{condition}"] = sum(finite) / len(finite) if finite else float("nan")
                for relation, value in zip(self.relations, values):
                    per_relation.setdefault(relation, {})[condition] = value
        rows = self.rows
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            parts: list = [None] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(parts, rows)
            rows = [r for part in parts for r in part]
        metrics |= benchmark_summary(rows)
        self.results = {"metrics": metrics, "probe_per_relation": per_relation, "rows": sorted(rows, key=lambda r: r["index"])}
        for metric in (self.edit_metric, self.generalization, self.held_first, self.held_inside, self.intra,
                       self.intra_same, self.intra_other, self.inter,
                       self.drift, self.edit_errors, self.probed, self.seconds, self.peak_memory,
                       self.entropy_before, self.entropy_after,
                       *self.probe_metrics.values()):  # fmt: skip
            metric.reset()


class BatchEditEvaluation(EditEvaluation):
    """mode=batch: every case of the data module edited in ONE ``Editor.apply`` (all requests at once), then each
    fact measured and recorded exactly as EditEvaluation measures a single edit (the same unedited measurements,
    metrics and row fields, one row per fact), and the one edit reverted at the end. Its seconds and peak memory
    are the one edit's (recorded at the first fact); the text is measured once after it; the suppress/amplify
    probe is not run (it measures the unedited model's neurons: the single-edit evaluation does that)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.probe_config = replace(self.probe_config, enabled=False)
        self.batch_edit: Edit | None = None
        self.batch_error: str | None = None

    def on_test_start(self) -> None:
        if self.trainer.world_size > 1:
            raise ConfigError("batch evaluation runs in one process: the facts are edited in one edit")
        super().on_test_start()
        cases = list(self.trainer.datamodule.cases)
        self._cases_before = {}
        for case in cases:  # every fact's unedited measurements before the edit
            pairs, _ = self._pairs(case)
            gen_prompts = self._generation_prompts(case) if self.fluency_on else []
            self._cases_before[case.index] = (self._case_before(case, pairs, gen_prompts), self._benchmark_before(case))
        base = weights_state(self.km)
        self.batch_edit, self.batch_error = self._apply_edit([r for c in cases for r in c.requests])
        self._text_after = self._text_nll(self.batch_edit, base) if self.batch_edit is not None and self._text else None
        self._gen_after: dict[int, list] = {}
        if self.batch_edit is not None and self.fluency_on:  # every fact's generations in batches
            made = self._generate_groups([self._generation_prompts(c) for c in cases])
            self._gen_after = {case.index: generations for case, generations in zip(cases, made)}
        self._first = True

    def test_step(self, case: EditCase, batch_idx: int) -> None:
        pairs, at = self._pairs(case)
        after = bench_after = None
        before, bench_before = self._cases_before[case.index]
        if self.batch_edit is not None:
            after = (*self._after(pairs, [], text_after=self._text_after, generate=False)[:3],
                     self._gen_after.get(case.index, []))
            bench_after = self._benchmark_measure(case)
        row = self._record(case, at, before, after, self.batch_edit, self.batch_error, timed=self._first)
        self._benchmark_row(case, row, bench_before, bench_after, (after or before)[-1])
        self.rows.append(row)
        self._first = False

    def on_test_end(self) -> None:
        self.restore()
        super().on_test_end()

    def restore(self) -> None:
        """Revert the batch edit (also after a stopped run) and check its slices are back bit for bit."""
        edit, self.batch_edit = self.batch_edit, None
        if edit is not None and edit.active:
            edit.revert()
            if self.verify_revert:
                check_reverted(self.km, edit)
