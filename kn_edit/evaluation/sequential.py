"""Sequential editing: edits applied one after another without reverting, measured at checkpoints (does edit 1
still hold after edit 50? what happens to other facts, to text, to generation?), then every edit reverted and
the model checked bit for bit against its state before the run.

A Lightning test loop like the single-edit evaluation, with one case per step in order; it runs in one process
(each edit depends on every edit before it, so the facts cannot be split across processes). At each checkpoint n:

* ``edits/held``: share of the n facts (an edit the editor refused counts as not held) whose new object is
  still the greedy answer on every edit prompt; ``edits/top1``: the same per prompt, averaged per fact;
* ``generalization/top1``: new object top-1 on the held-out paraphrases of the facts edited so far;
* ``intra/retained`` / ``inter/retained``: of a fixed pool of facts never edited in the run (the cases'
  same-relation and other-relation neighbours), the share of those answered correctly before the run that
  still are;
* ``drift/change``: relative change of the held-out text's perplexity; ``fluency/entropy``: n-gram entropy of
  greedy generations from a fixed set of subjects (before the run: checkpoint 0).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Sequence

import pytorch_lightning as pl
import torch

from ..errors import ConfigError, EditError, KnEditError
from . import functional as Fn
from .config import FluencyConfig
from .datamodule import EditCase
from .fluency import greedy_generations, ngram_entropy
from .module import GENERATION_TEMPLATES, score_pairs, text_nll, tokenized_text

if TYPE_CHECKING:
    from ..models.model import KnModel


@dataclass
class Checkpoint:
    n_edits: int
    metrics: dict[str, float]


@dataclass
class _Pool:
    """Facts never edited in the run, their prompts with the gold object, and which were right before."""

    pairs: list[tuple[str, str]] = field(default_factory=list)
    correct_before: torch.Tensor | None = None


class SequentialEvaluation(pl.LightningModule):
    """Apply ``editor`` to the cases in order, measure after each checkpoint's number of edits, revert all."""

    def __init__(self, km: KnModel, editor, passages: Sequence[str] = (),
                 checkpoints: Sequence[int] = (1, 10, 25, 50, 100),
                 fluency: FluencyConfig | None = None, max_text_tokens: int = 128, text_batch_size: int = 8,
                 batch_size: int = 64, on_checkpoint: Callable[["SequentialEvaluation"], None] | None = None) -> None:
        super().__init__()
        self.km = km
        self.net = km.model
        self.editor = editor
        self.passages = list(passages) if not km.is_masked_lm else []
        self.checkpoints = sorted(set(int(c) for c in checkpoints))
        if not self.checkpoints or self.checkpoints[0] < 1:
            raise ConfigError(f"checkpoints must be edit counts >= 1, got {list(checkpoints)}")
        self.fluency = fluency or FluencyConfig(enabled=False)
        self.max_text_tokens, self.text_batch_size, self.batch_size = max_text_tokens, text_batch_size, batch_size
        self.made: list[tuple[EditCase, object | None, str | None]] = []  # (case, edit or None, error)
        self.curve: list[Checkpoint] = []
        self._pristine: dict[str, torch.Tensor] | None = None
        # called after every checkpoint's measurement (e.g. to write the curve so far: a long run that is
        # stopped keeps what it measured)
        self.on_checkpoint = on_checkpoint

    # ----- before the first edit ----------------------------------------------------------------------
    def on_test_start(self) -> None:
        if self.trainer.world_size > 1:
            raise ConfigError("sequential evaluation runs in one process: each edit builds on the ones before it")
        cases = list(self.trainer.datamodule.cases)
        self.total = min(len(cases), self.checkpoints[-1])
        edited = {c.fact.fact_id for c in cases[: self.total]}
        self._pools = {"intra": _Pool(), "inter": _Pool()}
        seen: set[tuple[str, str]] = set()
        for case in cases[: self.total]:
            for name, records in (("intra", case.same_relation), ("inter", case.other_relation)):
                for r in records:
                    if r.fact_id not in edited and (name, r.fact_id) not in seen:
                        seen.add((name, r.fact_id))
                        self._pools[name].pairs += [(p, r.object) for p in r.all_prompts]
        for pool in self._pools.values():
            pool.correct_before = score_pairs(self.km, pool.pairs, self.batch_size)[1] if pool.pairs else None
        self._text = tokenized_text(self.km, self.passages, self.max_text_tokens)
        self._ppl_before = float(Fn.perplexity(*text_nll(self.km, self._text, self.text_batch_size))) if self._text else None
        subjects = list(dict.fromkeys(c.fact.subject for c in cases[: self.total]))[: self.fluency.prompts]
        self._gen_prompts = ([GENERATION_TEMPLATES[1].format(s) for s in subjects]
                             if self.fluency.enabled and not self.km.is_masked_lm else [])  # fmt: skip
        # Kept to check, at the end, that reverting every edit gives the model back bit for bit.
        self._pristine = {k: v.detach().to("cpu", copy=True) for k, v in self.km.model.named_parameters()}
        self.made, self.curve = [], [Checkpoint(0, self._measure())]

    # ----- the loop ---------------------------------------------------------------------------------
    def test_step(self, case: EditCase, batch_idx: int) -> None:
        if batch_idx >= self.total:
            return
        edit, error = None, None
        try:
            with torch.enable_grad():
                edit = self.editor.apply(self.km, [case.request])
        except KnEditError as exc:
            error = f"{type(exc).__name__}: {exc}"  # the editor left the model as it was
        self.made.append((case, edit, error))
        n = len(self.made)
        if n in self.checkpoints or n == self.total:
            self.curve.append(Checkpoint(n, self._measure()))
            if self.on_checkpoint is not None:
                self.on_checkpoint(self)

    def _measure(self) -> dict[str, float]:
        out: dict[str, float] = {"edits/refused": float(sum(e is None for _, e, _ in self.made))}
        if self.made:
            pairs, owner, held_pairs, held_owner = [], [], [], []
            for j, (case, _, _) in enumerate(self.made):
                pairs += [(p, case.new) for p in case.fact.prompts]
                owner += [j] * len(case.fact.prompts)
                held_pairs += [(p, case.new) for p in case.fact.heldout_prompts]
                held_owner += [j] * len(case.fact.heldout_prompts)
            top1 = score_pairs(self.km, pairs, self.batch_size)[1].cpu()
            per_fact = [top1[[i for i, o in enumerate(owner) if o == j]] for j in range(len(self.made))]
            out["edits/top1"] = sum(float(t.float().mean()) for t in per_fact) / len(per_fact)
            out["edits/held"] = sum(bool(t.all()) for t in per_fact) / len(per_fact)
            if held_pairs:
                top1 = score_pairs(self.km, held_pairs, self.batch_size)[1].cpu()
                facts = sorted(set(held_owner))
                out["generalization/top1"] = sum(
                    float(top1[[i for i, o in enumerate(held_owner) if o == j]].float().mean()) for j in facts) / len(facts)
        for name, pool in self._pools.items():
            if pool.correct_before is not None and bool(pool.correct_before.any()):
                now = score_pairs(self.km, pool.pairs, self.batch_size)[1]
                out[f"{name}/retained"] = float((pool.correct_before & now).sum() / pool.correct_before.sum())
        if self._ppl_before is not None:
            ppl = float(Fn.perplexity(*text_nll(self.km, self._text, self.text_batch_size)))
            out["drift/change"] = ppl / self._ppl_before - 1
        if self._gen_prompts:
            gens = greedy_generations(self.km, self._gen_prompts, self.fluency.max_new_tokens)
            out["fluency/entropy"] = ngram_entropy([g.text for g in gens])
        return out

    # ----- after the last edit (also after an error: the runner calls restore) ------------------------
    def on_test_end(self) -> None:
        self.restore()

    def restore(self) -> None:
        """Revert every edit made, newest first, and check the model is bit for bit as before the run."""
        for _, edit, _ in reversed(self.made):
            if edit is not None and edit.active:
                edit.revert()
        if self._pristine is not None:
            changed = [k for k, v in self.km.model.named_parameters() if not torch.equal(v.detach().cpu(), self._pristine[k])]
            self._pristine = None
            if changed:
                raise EditError(f"{self.editor.name}: the model is not as before the sequential run; changed: {changed[:5]}")

    def rows(self) -> list[dict]:
        return [{"order": i + 1, "fact_id": c.fact.fact_id, "relation": c.fact.relation, "subject": c.fact.subject,
                 "old": c.fact.object, "new": c.new, **({"error": err} if err else {}),
                 **({"report": e.report.to_dict()} if e is not None and e.report is not None else {})}
                for i, (c, e, err) in enumerate(self.made)]  # fmt: skip
