"""The signed rule's ``gradient`` direction on tiny models of every family: the gradients of the logit gap
with respect to the value vectors equal a plain one-prompt-at-a-time computation, the value vectors move
exactly by the formula, and the scale means what the docs say (to first order, s is the gain of the mean gap)."""

from __future__ import annotations

import pytest
import torch

import kn_edit
from helpers import RULE_NEURONS as NEURONS  # the three neurons the rule tests edit
from helpers import assert_only_neurons_changed, assert_same, neuron_slice, new_object, raw_value, snapshot
from kn_edit import ConfigError, Neuron
from kn_edit.editing.preserve import preservation_metric
from kn_edit.editing.sensitivity import least_norm_step, value_gradients
from tiny_models import prompt_for


# ----- plain reference: one prompt at a time, the gradient of the raw weight, the neuron's slice of it ------
def raw_gap_gradient(km, prompts: list[str], old: str, new: str, n: Neuron) -> torch.Tensor:
    """∂/∂v_n of the mean over prompts of logit(new) − logit(old) at the first answer step."""
    w = km.value_proj(n.layer).weight
    total = torch.zeros(km.d_model)
    for prompt in prompts:
        step = km.encode(prompt, new).steps[0]
        old_id = km.encode(prompt, old).target_ids[0]
        logits = km.model(input_ids=step.input_ids[None]).logits[0, step.position]
        (g,) = torch.autograd.grad(logits[step.target_id] - logits[old_id], [w])
        total += neuron_slice(km, g, n.index)
    return total / len(prompts)


def mean_gap(km, prompts: list[str], old: str, new: str) -> float:
    gaps = []
    for prompt in prompts:
        step = km.encode(prompt, new).steps[0]
        old_id = km.encode(prompt, old).target_ids[0]
        with torch.no_grad():
            logits = km.model(input_ids=step.input_ids[None]).logits[0, step.position]
        gaps.append(float(logits[step.target_id] - logits[old_id]))
    return sum(gaps) / len(gaps)


def two_prompts(km) -> list[str]:
    prompt, _ = prompt_for(km.adapter.family)
    return [prompt, prompt.replace("The capital of France", "France's capital city")]  # lengths differ: padding


def test_value_gradients_match_the_plain_reference(tiny):
    _, old = prompt_for(tiny.adapter.family)
    new = new_object(tiny)
    prompts = two_prompts(tiny)
    steps = [tiny.encode(p, new).steps[0] for p in prompts]
    old_ids = [tiny.encode(p, old).target_ids[0] for p in prompts]
    neurons = [Neuron(1, 5), Neuron(0, 3), Neuron(1, 7)]
    got = value_gradients(tiny, steps, neurons, old_ids)
    assert got.shape == (3, tiny.d_model)
    for row, n in zip(got, neurons):
        ref = raw_gap_gradient(tiny, prompts, old, new, n)
        torch.testing.assert_close(row, ref, rtol=1e-4, atol=1e-5 * float(ref.abs().max()) + 1e-9)


# ----- plain reference for the preservation metric and the least-norm step --------------------------------
def raw_metric(km, neurons, prompts, ridge: float) -> torch.Tensor:
    """C + ridge*mean(diag C)*I with C the mean over every token of a(x) a(x)^T, one prompt at a time."""
    rows = []
    for prompt in prompts:
        if km.is_masked_lm:
            prompt += " [MASK]."
        ids = torch.tensor(km.tokenizer(prompt)["input_ids"])
        seen = {}
        handles = [km.value_proj(l).register_forward_pre_hook(lambda _m, args, l=l: seen.__setitem__(l, args[0][0].detach()))
                   for l in {n.layer for n in neurons}]
        try:
            with torch.no_grad():
                km.model(input_ids=ids[None])
        finally:
            for h in handles:
                h.remove()
        for t in range(len(ids)):
            rows.append(torch.tensor([float(seen[n.layer][t, n.index]) for n in neurons]))
    c = sum(torch.outer(r, r) for r in rows) / len(rows)
    return c + ridge * float(c.diagonal().mean()) * torch.eye(len(neurons))


def test_preservation_metric_matches_the_plain_reference(tiny):
    prompts = ["The weather today is", "She put the keys in the", "The capital of the region is"]
    neurons = [Neuron(0, 3), Neuron(1, 5), Neuron(1, 7), Neuron(0, 1)]
    got = preservation_metric(tiny, neurons, prompts, ridge=0.1)
    ref = raw_metric(tiny, neurons, prompts, ridge=0.1)
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-6 * float(ref.abs().max()))


def test_least_norm_step_solves_the_constrained_problem():
    """Against the KKT system of min d^T (M kron I) d s.t. K d = r, written out with Kronecker products."""
    torch.manual_seed(0)
    n, d, p = 4, 5, 2
    grads = torch.randn(p, n, d, dtype=torch.float64)
    r = torch.randn(p, dtype=torch.float64)
    a = torch.randn(n, n, dtype=torch.float64)
    metric = a @ a.T + 0.5 * torch.eye(n, dtype=torch.float64)
    for m in (None, metric):
        big = torch.kron(torch.eye(n, dtype=torch.float64) if m is None else m, torch.eye(d, dtype=torch.float64))
        k = grads.reshape(p, n * d)
        kkt = torch.zeros(n * d + p, n * d + p, dtype=torch.float64)
        kkt[: n * d, : n * d] = 2 * big
        kkt[: n * d, n * d :] = k.T
        kkt[n * d :, : n * d] = k
        solution = torch.linalg.solve(kkt, torch.cat([torch.zeros(n * d, dtype=torch.float64), r]))[: n * d]
        got = least_norm_step(grads, r, m)
        torch.testing.assert_close(got.double(), solution.reshape(n, d), rtol=1e-4, atol=1e-5)


def raw_margin_gradient(km, prompt: str, new: str, n: Neuron) -> tuple[float, torch.Tensor]:
    """(margin, its gradient with respect to v_n): margin = logit(new) − the largest other logit."""
    step = km.encode(prompt, new).steps[0]
    w = km.value_proj(n.layer).weight
    logits = km.model(input_ids=step.input_ids[None]).logits[0, step.position]
    others = logits.detach().clone()
    others[step.target_id] = float("-inf")
    margin = logits[step.target_id] - logits[int(others.argmax())]
    (g,) = torch.autograd.grad(margin, [w])
    return float(margin.detach()), neuron_slice(km, g, n.index)


@pytest.mark.parametrize("preserve", [False, True])
def test_gradient_rule_one_step_formula(tiny, preserve):
    """One linearization step: delta = M^-1 sum_p lambda_p k_p with <k_p, delta> = margin + 1/2 - margin_p for
    each edit prompt, k_p the gradient of prompt p's margin; M the preservation metric (generic prompts) or I."""
    from kn_edit.editing.filters import GENERIC_PROMPTS

    _, old = prompt_for(tiny.adapter.family)
    new = new_object(tiny)
    prompts = two_prompts(tiny)
    before = snapshot(tiny)
    margins, ks = [], []
    for p in prompts:
        rows = [raw_margin_gradient(tiny, p, new, n) for n in NEURONS]
        margins.append(rows[0][0])
        ks.append(torch.stack([g for _, g in rows]).double())  # [n, d]
    assert max(margins) < 1.0  # the tiny model does not already answer new
    m = raw_metric(tiny, NEURONS, GENERIC_PROMPTS, 0.1).double() if preserve else torch.eye(len(NEURONS), dtype=torch.float64)
    pulled = [torch.linalg.inv(m) @ k for k in ks]
    gram = torch.tensor([[float((a * b).sum()) for b in pulled] for a in ks], dtype=torch.float64)
    lam = torch.linalg.solve(gram, torch.tensor([1.5 - x for x in margins], dtype=torch.float64))
    delta = sum(l * p for l, p in zip(lam, pulled)).float()
    v0 = {n: raw_value(tiny, n) for n in NEURONS}
    edit = kn_edit.update_fact(tiny, prompts, old, new, neurons=NEURONS, force=True, direction="gradient",
                               preserve=preserve, solve_steps=1, on_failure="apply", max_change=1e6)
    size = float(torch.stack([v0[n] for n in NEURONS]).norm())
    assert edit.report.details.scale == pytest.approx(float(delta.norm()) / size, rel=1e-4)  # reported: |delta| / |V|
    expected = {n: v0[n] + delta[j] for j, n in enumerate(NEURONS)}
    assert_only_neurons_changed(tiny, before, NEURONS, expected, atol=1e-5 * float(delta.abs().max()) + 1e-6)
    edit.revert()
    assert_same(tiny, before)


def test_a_least_norm_step_moves_the_mean_gap_by_the_asked_amount_to_first_order(tiny_factory):
    km = tiny_factory("llama", n_layers=3)
    prompts = two_prompts(km)
    neurons = [Neuron(0, 2), Neuron(1, 4), Neuron(2, 6), Neuron(2, 9)]
    steps = [km.encode(p, "Rome").steps[0] for p in prompts]
    old_ids = [km.encode(p, "Paris").target_ids[0] for p in prompts]
    unit = least_norm_step(value_gradients(km, steps, neurons, old_ids)[None], torch.tensor([1.0]))  # gain 1
    before = mean_gap(km, prompts, "Paris", "Rome")
    s = 1e-3
    with torch.no_grad():
        for n, d in zip(neurons, unit):
            km.value_vectors(n.layer)[n.index] += s * d
    after = mean_gap(km, prompts, "Paris", "Rome")
    assert abs((after - before) / s - 1.0) < 0.01


def test_gradient_direction_reaches_the_margin_and_rejects_sign_weighting(tiny_factory):
    km = tiny_factory("llama")
    edit = kn_edit.update_fact(km, ["The capital of France is"], "Paris", "Rome", neurons=[Neuron(1, i) for i in range(8)],
                               force=True, generic_filter=False, margin=0.1, direction="gradient", max_change=1e3)
    assert edit.report.success and min(p.margin for p in edit.report.prompts) >= 0.1
    assert km.predict("The capital of France is", top_k=1)[0].token.strip() == "Rome"
    edit.revert()
    with pytest.raises(ConfigError, match="weighting=sign"):
        kn_edit.update_fact(km, ["The capital of France is"], "Paris", "Rome", neurons=NEURONS, force=True,
                            direction="gradient", weighting="sign")


def test_gradient_direction_edits_every_token_of_a_multi_token_object(tiny_factory):
    """The gradient direction constrains every token of new (teacher-forced): after the edit, greedy decoding
    gives the whole new object; success in the edit's report means exactly that."""
    from kn_edit.editing.targets import unpredicted

    km = tiny_factory("gpt2")
    prompt, new = "The capital of France is", "Madrid, Spain"
    assert len(km.encode(prompt, new).target_ids) > 1
    before = snapshot(km)
    edit = kn_edit.update_fact(km, [prompt], "Paris", new, neurons=[Neuron(1, i) for i in range(12)], force=True,
                               generic_filter=False, margin=0.1, max_change=1e4)
    assert edit.report.success and unpredicted(km, [prompt], new) == []
    steps = km.encode(prompt, new).steps
    logits = km.step_logits(list(steps))
    assert all(int(row.argmax()) == s.target_id for row, s in zip(logits, steps))
    edit.revert()
    assert_same(km, before)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_a_batch_is_one_least_change_problem_whose_constraints_all_hold(tiny_factory, family):
    """batch=joint: every request's prompts are constraints of one solve over the union of the neurons; after
    it every fact's new object leads by the margin (checked with a plain forward), and revert is bit for bit."""
    from kn_edit.editing import EditRequest, KnowledgeNeuronEditor

    km = tiny_factory(family)
    before = snapshot(km)
    requests = [EditRequest(("The capital of France is",), "Paris", "Rome"),
                EditRequest(("The official language of Italy is",), "Italian", "French")]  # fmt: skip
    neurons = [[Neuron(1, i) for i in range(12)], [Neuron(1, i) for i in range(6, 18)]]  # overlapping sets
    editor = KnowledgeNeuronEditor(neurons=neurons, force=True, generic_filter=False, margin=0.1, max_change=1e4)
    edit = editor.apply(km, requests)
    details = edit.report.details
    assert edit.report.success and details.requests[0].scale == details.requests[1].scale  # one solve, one scale
    assert sorted(edit.report.neurons) == [Neuron(1, i) for i in range(18)]  # the union, each neuron once
    with torch.no_grad():
        for request in requests:
            step = km.encode(request.prompts[0], request.new).steps[0]
            logits = km.model(input_ids=step.input_ids[None, :]).logits[0, step.position]
            gold = float(logits[step.target_id])
            logits[step.target_id] = float("-inf")
            assert gold - float(logits.max()) >= 0.1
    edit.revert()
    assert_same(km, before)
    # batch=sequential solves each request in turn on top of the ones before: two solves, two scales
    sequential = KnowledgeNeuronEditor(neurons=neurons, force=True, generic_filter=False, margin=0.1, max_change=1e4,
                                       batch="sequential", on_failure="apply").apply(km, requests)
    assert sequential.report.details.requests[0].scale != sequential.report.details.requests[1].scale
    sequential.revert()
    assert_same(km, before)
