"""Coarse-to-fine selection against a plain reference, the adaptive share rule, bad input, and one real fact."""

from __future__ import annotations

import pytest
import torch

from kn_edit import ConfigError, KnEditError, LocateConfig, Neuron, PromptError, TargetError
from kn_edit.locating.locate import (
    LocateResult,
    adaptive_share,
    kept_by_prompt,
    locate,
    locate_detailed,
    mean_neurons,
    relation_neurons,
    select,
)


def reference_select(scores: torch.Tensor, threshold: float, share: float) -> set[tuple[int, int]]:
    """KN_METHOD.md "coarse to fine" in plain Python loops."""
    n_prompts, n_layers, d_ff = scores.shape
    kept_sets = []
    for p in range(n_prompts):
        peak = max(float(scores[p, l, i]) for l in range(n_layers) for i in range(d_ff))
        kept_sets.append({(l, i) for l in range(n_layers) for i in range(d_ff) if float(scores[p, l, i]) > threshold * peak})
    counts: dict[tuple[int, int], int] = {}
    for kept in kept_sets:
        for key in kept:
            counts[key] = counts.get(key, 0) + 1
    return {key for key, c in counts.items() if c / n_prompts >= share - 1e-12}


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("threshold,share", [(0.2, 0.5), (0.5, 0.7), (0.1, 1.0), (1.0, 0.3), (0.3, 2 / 3)])
def test_select_matches_reference(seed, threshold, share):
    g = torch.Generator().manual_seed(seed)
    n_prompts = 1 + seed % 5
    # Heavy-tailed scores, as attribution gives: a few large, many near zero, some negative.
    scores = torch.randn(n_prompts, 4, 50, generator=g) ** 3
    got = select(scores, threshold, share)
    assert {(n.layer, n.index) for n in got} == reference_select(scores, threshold, share)
    means = scores.mean(dim=0)
    assert [float(means[n.layer, n.index]) for n in got] == sorted((float(means[n.layer, n.index]) for n in got), reverse=True)


def test_single_prompt_keeps_its_own_set():
    scores = torch.tensor([[[1.0, 0.25, 0.1, -2.0], [0.5, 0.0, 0.19, 0.21]]])
    for share in (0.01, 0.5, 1.0):
        assert set(select(scores, 0.2, share)) == {Neuron(0, 0), Neuron(0, 1), Neuron(1, 0), Neuron(1, 3)}


def test_prompt_without_positive_scores_keeps_nothing():
    scores = -torch.rand(1, 2, 8) - 0.1
    assert not kept_by_prompt(scores, 0.2).any()
    assert select(scores, 0.2, 1.0) == []


def test_layers_map_rows_to_model_layers():
    scores = torch.zeros(2, 2, 5)
    scores[:, 1, 3] = 1.0
    assert select(scores, 0.2, 1.0, layers=[7, 11]) == [Neuron(11, 3)]


def test_share_counts_prompts():
    # Neuron (0, i) is kept by exactly i of 10 prompts.
    scores = torch.zeros(10, 1, 11)
    scores[:, 0, 0] = 1.0  # every prompt's maximum, kept by all
    for i in range(1, 11):
        scores[:i, 0, i] = 0.5
    got = {n.index for n in select(scores, 0.2, 0.7)}
    assert got == {0, 7, 8, 9, 10}
    result = LocateResult.from_scores(["p"] * 10, "t", scores, [0], 0.2, 0.7)
    assert dict(zip([n.index for n in result.neurons], result.kept_by)) == {0: 10, 7: 7, 8: 8, 9: 9, 10: 10}
    assert result.with_share(0.35).neurons[-1] == Neuron(0, 4)


def kept_fact(n_prompts: int, counts: list[int]) -> torch.Tensor:
    """A kept mask [n_prompts, 1, len(counts)] where neuron j is kept by counts[j] prompts."""
    kept = torch.zeros(n_prompts, 1, len(counts), dtype=torch.bool)
    for j, c in enumerate(counts):
        kept[:c, 0, j] = True
    return kept


def test_adaptive_share_lowers_until_in_range():
    # 10 prompts per fact; neurons kept by 9 and 6 prompts: 1 neuron at p >= 0.65, 2 at 0.6.
    facts = [kept_fact(10, [9, 6, 2]) for _ in range(4)]
    chosen = adaptive_share(facts)
    assert chosen.share == pytest.approx(0.6)
    assert chosen.mean_neurons == 2.0
    assert [round(s, 2) for s, _ in chosen.tried] == [0.7, 0.65, 0.6]
    assert mean_neurons(facts, chosen.share) == 2.0


def test_adaptive_share_raises_until_in_range():
    # 20 prompts; 8 neurons kept by 14..20 prompts: at 0.7 all 8, at 0.85 (17 prompts) 4.
    facts = [kept_fact(20, [14, 15, 16, 17, 18, 19, 20, 20]) for _ in range(3)]
    chosen = adaptive_share(facts)
    assert chosen.share == pytest.approx(0.85)
    assert 2 <= chosen.mean_neurons <= 5


def test_adaptive_share_overshoot_picks_nearer_and_stops_at_bounds():
    # 1 neuron at p = 0.7 (distance 1 from [2, 5]); the next step jumps to 9 (distance 4): keep 0.7.
    facts = [kept_fact(20, [14] + [13] * 8)]
    chosen = adaptive_share(facts)
    assert chosen.share == pytest.approx(0.7) and chosen.mean_neurons == 1
    assert len(chosen.tried) == 2
    # Nothing ever kept: lowers to the smallest share in (0, 1] and stops there.
    empty = adaptive_share([kept_fact(5, [0, 0])])
    assert empty.share == pytest.approx(0.05) and empty.mean_neurons == 0


def test_adaptive_share_leaves_out_facts_with_few_prompts():
    facts = [kept_fact(10, [9, 8, 1]), kept_fact(2, [2, 2, 2, 2, 2, 2, 2, 2, 2])]
    chosen = adaptive_share(facts)
    assert chosen.n_facts_counted == 1
    assert chosen.share == pytest.approx(0.7) and chosen.mean_neurons == 2
    assert adaptive_share([kept_fact(2, [1])]).mean_neurons is None
    custom = adaptive_share(facts, LocateConfig(min_prompts=2, target_min=5, target_max=9))
    assert custom.n_facts_counted == 2 and custom.mean_neurons == pytest.approx((2 + 9) / 2)


def test_config_checks():
    with pytest.raises(ConfigError, match="share_step"):
        LocateConfig(share_step=0).check()
    with pytest.raises(ConfigError, match="target_min"):
        LocateConfig(target_min=6, target_max=5).check()
    with pytest.raises(ConfigError, match="min_prompts"):
        LocateConfig(min_prompts=0).check()


# ----- with a model --------------------------------------------------------------------------------------
def test_locate_equals_selection_of_attribution(tiny_factory):
    from kn_edit.locating.attribution import attribute_prompts

    km = tiny_factory("gpt2")
    prompts = ["The capital of France is", "Paris is the capital of", "The Eiffel Tower is in"]
    result = locate_detailed(km, prompts, "Paris", threshold=0.3, share=0.6, steps=4)
    scores = attribute_prompts(km, prompts, "Paris", steps=4)
    torch.testing.assert_close(result.scores, scores)
    assert result.neurons == select(scores, 0.3, 0.6)
    assert result.neurons == locate(km, prompts, "Paris", threshold=0.3, share=0.6, steps=4)
    assert result.neurons, "three prompts on a random model still share their strongest neurons"
    assert result.to_dict()["neurons"][0]["layer"] == result.neurons[0].layer


def test_locate_restricted_layers(tiny_factory):
    km = tiny_factory("bert", n_layers=3)
    result = locate_detailed(km, ["The capital of France is [MASK]."], "paris", steps=3, layers=[2, 0])
    assert result.scores.shape == (1, 2, km.d_ff)
    assert {n.layer for n in result.neurons} <= {0, 2}
    assert set(result.kept_per_layer()) == {2, 0}


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        ({"threshold": 0.0}, ConfigError, "threshold"),
        ({"threshold": 1.5}, ConfigError, "threshold"),
        ({"share": 0.0}, ConfigError, "share"),
        ({"share": 1.01}, ConfigError, "share"),
        ({"steps": 0}, ConfigError, "steps"),
        ({"prompts": []}, PromptError, "no prompts"),
        ({"subject": "France", "prompts": ["The capital of France is", "The capital of Italy is"]}, PromptError,
         "different facts mixed"),
        ({"layers": [0, 9]}, ConfigError, "layers"),
        ({"target": "\u2603\u2603"}, TargetError, "cannot express"),
    ],
)
def test_bad_input(tiny_factory, kwargs, error, match):
    km = tiny_factory("bert")
    args = {"prompts": ["The capital of France is [MASK]."], "target": "paris", "steps": 2, **kwargs}
    if "subject" in kwargs:
        args["prompts"] = [p + " [MASK]." for p in kwargs["prompts"]]
    with pytest.raises(error, match=match):
        locate(km, **args)
    assert issubclass(error, KnEditError)


@pytest.mark.integration
def test_smollm2_paris_neurons_matter_more_than_random(smollm2):
    """Located neurons of 'capital of France → Paris' exist, and suppressing them lowers P(Paris) far more
    than suppressing as many random neurons of the same layers. The top 10 layers and 4 steps keep it
    short (120 attribution rows)."""
    from kn_edit.locating.probe import probe

    prompts = ["The capital of France is", "The capital city of France is", "France's capital is"]
    result = locate_detailed(smollm2, prompts, "Paris", steps=4, layers=list(range(20, 30)), subject="France")
    assert 1 <= len(result.neurons) <= 100
    outcome = probe(smollm2, prompts, "Paris", result.neurons, n_controls=2)
    ratios = outcome.mean_ratios()
    assert ratios["suppressed"] < -0.3
    assert ratios["suppressed"] < ratios["control_suppressed"] - 0.2
    assert ratios["amplified"] > ratios["control_amplified"]


def test_plot_helpers_match_plain_loops(tmp_path):
    from kn_edit.locating.plots import binned_max, plot_locate, relative_scores

    g = torch.Generator().manual_seed(3)
    scores = torch.randn(2, 3, 10, generator=g)
    scores[:, 0, 0] = 5.0
    result = LocateResult.from_scores(["a", "b"], "t", scores, [0, 1, 2], 0.2, 0.5)
    rel = relative_scores(result)
    for l in range(3):
        for i in range(10):
            expected = sum(float(scores[p, l, i]) / float(scores[p].max()) for p in range(2)) / 2
            assert float(rel[l, i]) == pytest.approx(expected, rel=1e-6)
    binned, width = binned_max(rel, max_columns=4)
    assert width == 3 and binned.shape == (3, 4)
    for l in range(3):
        for b in range(4):
            assert float(binned[l, b]) == float(rel[l, b * 3 : b * 3 + 3].max())
    path = plot_locate(result, tmp_path / "sub" / "plot.png")
    assert path.read_bytes()[:4] == b"\x89PNG"


def test_relation_neurons():
    a, b, c = Neuron(0, 1), Neuron(2, 3), Neuron(5, 5)
    facts = [[a, b], [a], [a, c], [b]] + [[] for _ in range(6)]
    assert relation_neurons(facts, 0.1) == [(a, 3), (b, 2), (c, 1)]
    assert relation_neurons(facts, 0.2) == [(a, 3), (b, 2)]
    assert relation_neurons(facts, 0.3) == [(a, 3)]
    with pytest.raises(ConfigError):
        relation_neurons(facts, 0.0)
