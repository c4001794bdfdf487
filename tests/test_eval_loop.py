"""The evaluation loop end to end on tiny models: every metric present, the model bit for bit unchanged,
editor failures counted, the same numbers under the DDP strategy on two CPU processes."""

from __future__ import annotations

import json
import math

import pytest
import torch

from helpers import LANGUAGES, PASSAGES, SUBJECTS, ValueVectorEditor, assert_same, snapshot, tiny_config, tiny_facts
from kn_edit.data.records import FactRecord, FactSet
from kn_edit.errors import EditError
from kn_edit.evaluation import evaluate
from kn_edit.evaluation.metrics import row_metrics
from kn_edit.evaluation.report import SUMMARY


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_tiny_run_has_every_metric_and_leaves_the_model_unchanged(tiny_factory, tmp_path, family):
    km = tiny_factory(family)
    before = snapshot(km)
    result = evaluate(tiny_config(tmp_path), km=km, editor=ValueVectorEditor(), facts=tiny_facts(), passages=PASSAGES)
    assert_same(km, before)
    for key, _ in SUMMARY:
        assert key in result.metrics, key
    assert result.metrics["edit/n_facts"] == len(tiny_facts().records)
    assert result.metrics["generalization/n_facts"] == len(SUBJECTS)  # only the capitals have held-out prompts
    assert result.metrics["probe/facts"] == len(tiny_facts().records)
    for key in ("edit/top1", "intra/ppl_before", "inter/ppl_after", "drift/mean_change", "probe/suppressed"):
        assert math.isfinite(result.metrics[key]), key
    # The edit really changed the model while it was applied: the new object's probability moved.
    assert result.metrics["edit/delta_p_new"] != 0.0
    run = result.run_dir
    rows = [json.loads(line) for line in (run / "facts.jsonl").read_text().splitlines()]
    assert sorted(r["fact_id"] for r in rows) == sorted(r.fact_id for r in tiny_facts().records)
    assert json.loads((run / "metrics.json").read_text())["metrics"]["edit/n_facts"] == len(rows)
    for name in ("report.md", "relations.png", "suppress_amplify.png", "config.yaml"):
        assert (run / name).is_file(), name


def test_editor_failures_count_as_failed_edits(tiny_factory, tmp_path):
    km = tiny_factory("llama")
    config = tiny_config(tmp_path, **{"probe.enabled": False})
    result = evaluate(config, km=km, editor=ValueVectorEditor(fail_on=["France", "Italy"]), facts=tiny_facts(),
                      passages=PASSAGES, write=False)  # fmt: skip
    assert result.metrics["run/edit_errors"] == 4  # France and Italy, in both relations
    failed = [r for r in result.rows if "error" in r]
    assert len(failed) == 4 and all(r["edit"]["delta_p_new"] == 0.0 for r in failed)
    assert all(r["intra"]["kept"] == r["intra"]["correct_before"] for r in failed if "intra" in r)


class LeakyEditor(ValueVectorEditor):
    """Also writes to a weight behind the ledger's back, so revert() cannot undo that change."""

    def compute(self, km, requests):
        with torch.no_grad():
            km.value_vectors(0)[0] += 1.0
        return super().compute(km, requests)


def test_an_editor_that_does_not_revert_fails_the_run(tiny_factory, tmp_path):
    km = tiny_factory("llama")
    config = tiny_config(tmp_path, **{"probe.enabled": False})
    with pytest.raises(EditError, match="not as before the run"):
        evaluate(config, km=km, editor=LeakyEditor(), facts=tiny_facts(), passages=PASSAGES, write=False)


def test_masked_lm_run_measures_everything_but_text_perplexity(tiny_factory, tmp_path):
    km = tiny_factory("bert")
    before = snapshot(km)
    records = [FactRecord(f"capital:{s}", s.lower(), "capital", o.lower(), (f"the capital of {s.lower()} is [MASK].",),
                          (f"{s.lower()} has the capital [MASK].",)) for s, o in SUBJECTS[:4]]  # fmt: skip
    records += [FactRecord(f"language:{s}", s.lower(), "language", o.lower(), (f"the official language of {s.lower()} is [MASK].",))
                for s, o in LANGUAGES[:2]]  # fmt: skip
    result = evaluate(tiny_config(tmp_path), km=km, editor=ValueVectorEditor(), facts=FactSet("masked", records),
                      passages=PASSAGES, write=False)  # fmt: skip
    assert_same(km, before)
    assert result.metrics["edit/n_facts"] == 6 and result.metrics["generalization/n_facts"] == 4
    assert not any(k.startswith("drift/") for k in result.metrics)  # causal-LM perplexity only
    assert math.isfinite(result.metrics["probe/suppressed"])


def _plain_scores(km, prompt: str, target: str) -> tuple[float, bool]:
    """(log P(target), every token top-1) by one unbatched teacher-forced forward per answer token."""
    logp, top1 = 0.0, True
    with torch.no_grad():
        for step in km.encode(prompt, target).steps:
            logits = km.model(input_ids=step.input_ids[None, :]).logits[0, step.position].float()
            logp += float(torch.log_softmax(logits, -1)[step.target_id])
            top1 &= int(logits.argmax()) == step.target_id
    return logp, top1


def _plain_text_ppl(km, passages, max_tokens: int) -> float:
    nll, count = 0.0, 0
    with torch.no_grad():
        for text in passages:
            ids = km.tokenizer(text, add_special_tokens=True)["input_ids"][:max_tokens]
            logits = km.model(input_ids=torch.tensor([ids])).logits[0, :-1].float()
            nll += float(torch.nn.functional.cross_entropy(logits, torch.tensor(ids[1:]), reduction="sum"))
            count += len(ids) - 1
    return math.exp(nll / count)


def split_facts() -> FactSet:
    """tiny_facts with held-out paraphrases that begin with the subject (every capital), with it inside (every
    other capital) and none (the languages)."""
    records = [FactRecord(r.fact_id, r.subject, r.relation, r.object, r.prompts,
                          ((f"{r.subject}'s capital city is",) + r.heldout_prompts[: i % 2]) if r.heldout_prompts else ())
               for i, r in enumerate(tiny_facts().records)]
    return FactSet("split", records)


def test_tiny_run_metrics_equal_a_plain_recomputation(tiny_factory, tmp_path):
    """Every prompt slice reaches its metric: edit, generalization (all held-out paraphrases, those that begin
    with the subject, those with it inside), intra (all / same object / other object), inter and text drift,
    recomputed here one prompt at a time from the same cases."""
    from kn_edit.evaluation.datamodule import FactDataModule

    km = tiny_factory("llama")
    config = tiny_config(tmp_path, **{"probe.enabled": False})
    editor = ValueVectorEditor(scale=5.0)  # some paraphrases reach the new object, some not
    result = evaluate(config, km=km, editor=editor, facts=split_facts(), passages=PASSAGES, write=False)
    datamodule = FactDataModule(km, config.data, facts=split_facts())
    datamodule.setup("test")
    edit_top1, held_top1, held_beats, drift = [], [], [], []
    held_split: dict[bool, list[float]] = {True: [], False: []}  # per fact: top-1 share of its subject-first / inside
    # [kept, correct before, correct after, n prompts, summed -log P(gold) after]
    pooled = {k: [0, 0, 0, 0, 0.0] for k in ("intra", "intra_same", "intra_other", "inter")}
    text_before = _plain_text_ppl(km, PASSAGES, config.text.max_tokens)
    for case in datamodule.cases:
        fact = case.fact
        groups = {"intra_same": [r for r in case.same_relation if r.object == fact.object],
                  "intra_other": [r for r in case.same_relation if r.object != fact.object],
                  "inter": list(case.other_relation)}  # fmt: skip
        before = {k: [_plain_scores(km, p, r.object) for r in rs for p in r.all_prompts] for k, rs in groups.items()}
        edit = editor.apply(km, [case.request])
        try:
            edit_top1.append(sum(_plain_scores(km, p, case.new)[1] for p in fact.prompts) / len(fact.prompts))
            if fact.heldout_prompts:
                new = [_plain_scores(km, p, case.new) for p in fact.heldout_prompts]
                old = [_plain_scores(km, p, fact.object)[0] for p in fact.heldout_prompts]
                held_top1.append(sum(t for _, t in new) / len(new))
                for first in (True, False):
                    part = [t for p, (_, t) in zip(fact.heldout_prompts, new) if p.startswith(fact.subject) == first]
                    if part:
                        held_split[first].append(sum(part) / len(part))
                held_beats.append(sum(n > o for (n, _), o in zip(new, old)) / len(new))
            after = {k: [_plain_scores(km, p, r.object) for r in rs for p in r.all_prompts] for k, rs in groups.items()}
            drift.append(_plain_text_ppl(km, PASSAGES, config.text.max_tokens) / text_before - 1)
        finally:
            edit.revert()
        for k in groups:
            counts = [sum(b[1] and a[1] for b, a in zip(before[k], after[k])), sum(b[1] for b in before[k]),
                      sum(a[1] for a in after[k]), len(after[k]), -sum(a[0] for a in after[k])]  # fmt: skip
            for name in (k, "intra") if k.startswith("intra") else (k,):
                pooled[name] = [x + y for x, y in zip(pooled[name], counts)]
    m = result.metrics
    assert m["edit/top1"] == pytest.approx(sum(edit_top1) / len(edit_top1), abs=1e-9)
    assert m["generalization/top1"] == pytest.approx(sum(held_top1) / len(held_top1), abs=1e-9)
    assert m["generalization/new_beats_old"] == pytest.approx(sum(held_beats) / len(held_beats), abs=1e-9)
    assert len(held_split[True]) == len(SUBJECTS) and len(held_split[False]) == len(SUBJECTS) // 2
    for first, name in ((True, "first"), (False, "inside")):
        want = sum(held_split[first]) / len(held_split[first])
        assert m[f"generalization/top1_subject_{name}"] == pytest.approx(want, abs=1e-9), name
    assert 0 < sum(held_top1) < len(held_top1)  # the split is not trivially all or nothing
    assert row_metrics(result.rows)["generalization/top1_subject_first"] == pytest.approx(
        m["generalization/top1_subject_first"], abs=1e-9)
    for name, (kept, correct, correct_after, n, nll_after) in pooled.items():
        assert n > 0 and m[f"{name}/n_prompts"] == n, name
        want = kept / correct if correct else float("nan")
        assert m[f"{name}/retained"] == pytest.approx(want, abs=1e-9, nan_ok=True), name
        assert m[f"{name}/acc_after"] == pytest.approx(correct_after / n, abs=1e-9), name
        assert m[f"{name}/ppl_after"] == pytest.approx(math.exp(nll_after / n), rel=1e-4), name
    assert m["drift/mean_change"] == pytest.approx(sum(drift) / len(drift), rel=1e-4, abs=1e-6)
    assert m["edit/seconds"] > 0


def test_sequential_run_measures_every_checkpoint_and_restores_the_model(tiny_factory, tmp_path):
    """mode=sequential: checkpoint metrics equal a plain recomputation with the edits applied one after another
    (an edit the editor refuses in the middle counts as not held), and the model is bit for bit the original."""
    from kn_edit.evaluation.datamodule import FactDataModule
    from kn_edit.evaluation.fluency import greedy_generations, ngram_entropy
    from kn_edit.evaluation.module import GENERATION_TEMPLATES

    km = tiny_factory("llama")
    before = snapshot(km)
    config = tiny_config(tmp_path, **{"probe.enabled": False})
    config.mode, config.checkpoints = "sequential", [1, 3, 5]
    editor = ValueVectorEditor(fail_on=["Japan"])
    result = evaluate(config, km=km, editor=editor, facts=tiny_facts(), passages=PASSAGES)
    assert_same(km, before)
    assert [c.n_edits for c in result.curve] == [0, 1, 3, 5]
    assert result.metrics["edits/n"] == 5 and (result.run_dir / "curve.json").is_file()
    assert result.metrics["edits/refused"] >= 1  # Japan is among the first five (the recomputation counts exactly)
    assert "Sequential edits" in (result.run_dir / "report.md").read_text()
    progress = json.loads(result.run_dir.with_name(result.run_dir.name + ".progress.json").read_text())
    assert progress["edits_made"] == progress["edits_planned"] == 5
    assert progress["curve"] == [{"n_edits": c.n_edits, **c.metrics} for c in result.curve]
    assert [r["order"] for r in progress["rows"]] == [1, 2, 3, 4, 5]

    # plain recomputation: the same cases, edited one after another
    datamodule = FactDataModule(km, config.data, facts=tiny_facts())
    datamodule.setup("test")
    cases = datamodule.cases[:5]
    edited = {c.fact.fact_id for c in cases}
    pools = {"intra": [], "inter": []}
    for case in cases:
        for name, records in (("intra", case.same_relation), ("inter", case.other_relation)):
            for r in records:
                if r.fact_id not in edited and all(r.fact_id != x.fact_id for x in pools[name]):
                    pools[name].append(r)
    right_before = {k: [_plain_scores(km, p, r.object)[1] for r in rs for p in r.all_prompts] for k, rs in pools.items()}
    ppl_before = _plain_text_ppl(km, PASSAGES, config.text.max_tokens)
    subjects = list(dict.fromkeys(c.fact.subject for c in cases))[: config.fluency.prompts]
    gen_prompts = [GENERATION_TEMPLATES[1].format(s) for s in subjects]
    edits, made = [], []
    try:
        for n, case in enumerate(cases, start=1):
            try:
                edits.append(editor.apply(km, [case.request]))
                made.append((case, True))
            except EditError:
                made.append((case, False))
            if n not in (1, 3, 5):
                continue
            got = next(c.metrics for c in result.curve if c.n_edits == n)
            held = [all(_plain_scores(km, p, c.new)[1] for p in c.fact.prompts) for c, _ in made]
            assert got["edits/held"] == pytest.approx(sum(held) / len(held)), n
            assert got["edits/refused"] == sum(not ok for _, ok in made)
            for name, rs in pools.items():
                now = [_plain_scores(km, p, r.object)[1] for r in rs for p in r.all_prompts]
                right = sum(right_before[name])
                if right:
                    assert got[f"{name}/retained"] == pytest.approx(
                        sum(b and a for b, a in zip(right_before[name], now)) / right), (name, n)
            assert got["drift/change"] == pytest.approx(_plain_text_ppl(km, PASSAGES, config.text.max_tokens) / ppl_before - 1,
                                                        rel=1e-4, abs=1e-6)  # fmt: skip
            texts = [g.text for g in greedy_generations(km, gen_prompts, config.fluency.max_new_tokens)]
            assert got["fluency/entropy"] == pytest.approx(ngram_entropy(texts))
    finally:
        for edit in reversed(edits):
            edit.revert()
    assert_same(km, before)


def test_sequential_run_restores_the_model_when_it_stops_half_way(tiny_factory, tmp_path):
    class Crashing(ValueVectorEditor):
        def compute(self, km, requests):
            if requests[0].subject == "Japan":
                raise RuntimeError("editor crashed")
            return super().compute(km, requests)

    km = tiny_factory("llama")
    before = snapshot(km)
    config = tiny_config(tmp_path, **{"probe.enabled": False})
    config.mode, config.checkpoints = "sequential", [1, 2, 6]
    order = [c.fact.subject for c in _cases(km, config)]
    progress = tmp_path / "progress.json"
    with pytest.raises(RuntimeError, match="crashed"):
        evaluate(config, km=km, editor=Crashing(), facts=tiny_facts(), passages=PASSAGES, write=False,
                 progress_path=progress)  # fmt: skip
    assert_same(km, before)
    # what was measured before the crash is kept: every checkpoint before Japan's edit
    kept = json.loads(progress.read_text())
    reached = [n for n in (1, 2, 6) if n <= order.index("Japan")]
    assert reached, "the test needs a checkpoint before the crash"
    assert [c["n_edits"] for c in kept["curve"]] == [0] + reached
    assert kept["edits_made"] == max(reached)


def test_sequential_progress_file_is_named_after_the_run_folder_without_run_name(tiny_factory, tmp_path, monkeypatch):
    """Without run_name the folder's name carries the time: it is taken once, so the progress file beside it has
    the same name even when the clock moves on between the start and the end of the run."""
    import itertools
    import time as time_module

    ticks = itertools.count()
    monkeypatch.setattr(time_module, "strftime", lambda fmt, *args: f"t{next(ticks):04d}")
    km = tiny_factory("llama")
    config = tiny_config(tmp_path, **{"probe.enabled": False})
    config.run_name, config.mode, config.checkpoints = None, "sequential", [1, 2]
    result = evaluate(config, km=km, editor=ValueVectorEditor(), facts=tiny_facts(), passages=PASSAGES)
    assert result.run_dir.name.startswith("tiny-t")
    assert result.run_dir.with_name(result.run_dir.name + ".progress.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("tiny-")) == [
        result.run_dir.name, result.run_dir.name + ".progress.json"]


def _cases(km, config):
    from kn_edit.evaluation.datamodule import FactDataModule

    datamodule = FactDataModule(km, config.data, facts=tiny_facts())
    datamodule.setup("test")
    return datamodule.cases
