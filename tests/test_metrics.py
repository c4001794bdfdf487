"""Metric math and torchmetrics classes against plainly written references, including the reduction across
two processes (gloo, CPU)."""

from __future__ import annotations

import math
import os

import pytest
import torch
import torch.multiprocessing as mp

from kn_edit.evaluation import functional as Fn
from kn_edit.evaluation.metrics import EditSuccess, GroupedMean, PerplexityDrift, Retention


def ref_log_prob(logits_row: list[float], target: int) -> float:
    """log of exp(x_t) / Σ exp(x_j), written out."""
    return logits_row[target] - math.log(sum(math.exp(x) for x in logits_row))


def make_answers(seed: int, n_answers: int = 6, vocab: int = 11):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, 4, (n_answers,), generator=g)
    owner = torch.repeat_interleave(torch.arange(n_answers), lengths)
    logits = torch.randn(len(owner), vocab, generator=g, dtype=torch.float64) * 3
    targets = torch.randint(0, vocab, (len(owner),), generator=g)
    targets[: len(owner) // 2] = logits[: len(owner) // 2].argmax(-1)  # some answers fully top-1
    return logits, targets, owner


def test_answer_scores_match_reference():
    logits, targets, owner = make_answers(0)
    logp, top1 = Fn.answer_scores(logits, targets, owner, 6)
    for a in range(6):
        steps = [i for i in range(len(owner)) if owner[i] == a]
        expected = sum(ref_log_prob(logits[i].tolist(), int(targets[i])) for i in steps)
        assert logp[a].item() == pytest.approx(expected, abs=1e-5)
        assert bool(top1[a]) == all(int(logits[i].argmax()) == int(targets[i]) for i in steps)


def test_answer_scores_quote_bad_shapes():
    with pytest.raises(ValueError, match=r"\(3, 5\)"):
        Fn.answer_scores(torch.zeros(3, 5), torch.zeros(2, dtype=torch.long), torch.zeros(2, dtype=torch.long), 1)


def fact_batches(seed: int, n_facts: int = 5):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n_facts):
        n = int(torch.randint(1, 5, (1,), generator=g))
        out.append((torch.rand(n, generator=g) > 0.5, -torch.rand(n, generator=g) * 5, -torch.rand(n, generator=g) * 5,
                    -torch.rand(n, generator=g) * 5))  # fmt: skip
    return out


def ref_edit_success(batches) -> dict[str, float]:
    top1 = beats = delta = 0.0
    for new_top1, new_after, old_after, new_before in batches:
        n = len(new_top1)
        top1 += sum(bool(x) for x in new_top1) / n
        beats += sum(1 for a, b in zip(new_after.tolist(), old_after.tolist()) if a > b) / n
        delta += sum(math.exp(a) - math.exp(b) for a, b in zip(new_after.tolist(), new_before.tolist())) / n
    k = len(batches)
    return {"top1": top1 / k, "new_beats_old": beats / k, "delta_p_new": delta / k, "n_facts": k}


def test_edit_success_macro_averages_over_facts():
    batches = fact_batches(1)
    metric = EditSuccess()
    for b in batches:
        metric.update(*b)
    metric.update(*(torch.zeros(0),) * 4)  # a fact without prompts (no held-out paraphrases) is not counted
    got = {k: float(v) for k, v in metric.compute().items()}
    assert got == pytest.approx(ref_edit_success(batches))


def retention_batches(seed: int, n: int = 4):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        k = int(torch.randint(1, 6, (1,), generator=g))
        out.append((torch.rand(k, generator=g) > 0.3, torch.rand(k, generator=g) > 0.5, -torch.rand(k, generator=g) * 4,
                    -torch.rand(k, generator=g) * 4))  # fmt: skip
    return out


def ref_retention(batches) -> dict[str, float]:
    before = [bool(x) for b in batches for x in b[0]]
    after = [bool(x) for b in batches for x in b[1]]
    lb = [x for b in batches for x in b[2].tolist()]
    la = [x for b in batches for x in b[3].tolist()]
    n = len(before)
    kept = sum(1 for x, y in zip(before, after) if x and y)
    ppl_b, ppl_a = math.exp(-sum(lb) / n), math.exp(-sum(la) / n)
    return {"acc_before": sum(before) / n, "acc_after": sum(after) / n, "retained": kept / sum(before),
            "ppl_before": ppl_b, "ppl_after": ppl_a, "ppl_change": ppl_a / ppl_b - 1, "n_prompts": n}  # fmt: skip


def test_retention_matches_reference():
    batches = retention_batches(2)
    metric = Retention()
    for b in batches:
        metric.update(*b)
    assert {k: float(v) for k, v in metric.compute().items()} == pytest.approx(ref_retention(batches))


def drift_edits(seed: int, n: int = 4):
    g = torch.Generator().manual_seed(seed)
    base = (torch.tensor(300.0), torch.tensor(100.0))
    return base, [(torch.rand((), generator=g) * 100 + 250, torch.tensor(100.0)) for _ in range(n)]


def ref_drift(base, edits) -> dict[str, float]:
    ppl0 = math.exp(float(base[0]) / float(base[1]))
    changes = [math.exp(float(nll) / float(t)) / ppl0 - 1 for nll, t in edits]
    logs = [float(nll) / float(t) - float(base[0]) / float(base[1]) for nll, t in edits]
    return {"mean_change": sum(changes) / len(changes), "max_change": max(changes), "ppl_before": ppl0,
            "mean_log_ratio": sum(logs) / len(logs), "share_large": sum(c > 0.1 for c in changes) / len(changes),
            "ppl_after": math.exp(sum(float(e[0]) for e in edits) / sum(float(e[1]) for e in edits)), "n_edits": len(edits)}  # fmt: skip


def test_perplexity_drift_matches_reference():
    base, edits = drift_edits(3)
    metric = PerplexityDrift()
    for nll, tokens in edits:
        metric.update(base[0], base[1], nll, tokens)
    assert {k: float(v) for k, v in metric.compute().items()} == pytest.approx(ref_drift(base, edits))


def test_token_nll_matches_reference():
    g = torch.Generator().manual_seed(4)
    logits = torch.randn(2, 5, 7, generator=g, dtype=torch.float64)
    ids = torch.randint(0, 7, (2, 5), generator=g)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    nll, count = Fn.token_nll(logits, ids, mask)
    expected, n = 0.0, 0
    for b in range(2):
        for t in range(1, 5):
            if mask[b, t]:
                expected -= ref_log_prob(logits[b, t - 1].tolist(), int(ids[b, t]))
                n += 1
    assert float(nll) == pytest.approx(expected) and int(count) == n == 6


def test_grouped_mean_matches_reference():
    values = torch.tensor([0.5, -1.0, 2.0, 4.0])
    groups = torch.tensor([0, 2, 0, 2])
    metric = GroupedMean(3)
    metric.update(values, groups)
    got = metric.compute()
    assert got[0].item() == pytest.approx(1.25) and math.isnan(got[1].item()) and got[2].item() == pytest.approx(1.5)


def test_change_ratio_is_the_relative_probability_change():
    before, after = torch.tensor([math.log(0.2)]), torch.tensor([math.log(0.05)])
    assert Fn.probability_change_ratio(before, after).item() == pytest.approx((0.05 - 0.2) / 0.2)


# ----- the same metrics reduced over two processes ---------------------------------------------------------
def _worker(rank: int, world: int, init_file: str, out_file: str) -> None:
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        edit, retention, drift, grouped = EditSuccess(), Retention(), PerplexityDrift(), GroupedMean(3)
        for b in fact_batches(1)[rank::world]:
            edit.update(*b)
        for b in retention_batches(2)[rank::world]:
            retention.update(*b)
        base, edits = drift_edits(3)
        for nll, tokens in edits[rank::world]:
            drift.update(base[0], base[1], nll, tokens)
        grouped.update(torch.tensor([0.5, 2.0][rank : rank + 1]), torch.tensor([0, 0][rank : rank + 1]))
        results = {
            "edit": {k: float(v) for k, v in edit.compute().items()},
            "retention": {k: float(v) for k, v in retention.compute().items()},
            "drift": {k: float(v) for k, v in drift.compute().items()},
            "grouped": grouped.compute().tolist(),
        }
        if rank == 0:
            torch.save(results, out_file)
    finally:
        torch.distributed.destroy_process_group()


def test_metrics_reduce_across_two_processes(tmp_path):
    out = tmp_path / "results.pt"
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    mp.spawn(_worker, args=(2, str(tmp_path / "init"), str(out)), nprocs=2, join=True)
    got = torch.load(out)
    assert got["edit"] == pytest.approx(ref_edit_success(fact_batches(1)))
    assert got["retention"] == pytest.approx(ref_retention(retention_batches(2)))
    assert got["drift"] == pytest.approx(ref_drift(*drift_edits(3)))
    assert got["grouped"][0] == pytest.approx(1.25) and math.isnan(got["grouped"][1])
