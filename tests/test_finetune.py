"""Constrained fine-tuning (FT-L / FT-M): the L∞ bound after every step, only the declared parameter changes,
bit-for-bit reverts (alone, stacked with a knowledge-neuron edit of the same layer, after an exception), the
losses against plainly written NLLs, success on an easy target, and config errors."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

import kn_edit
from helpers import changed, snapshot
from kn_edit import ConfigError, EditError, Neuron
from kn_edit.editing import ledger_for, make_editor, method_config
from kn_edit.editing.base import EditRequest
from kn_edit.editing.finetune import (
    FineTuneEditor,
    FineTuneSettings,
    FtLoss,
    default_layer,
    finetune_loss,
    weight_scale,
)
from kn_edit.editing.values import value_location

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ("The capital of France is", "Paris is the capital of")
REQUEST = EditRequest(PROMPTS[:1], "Paris", "Rome")


# ----- the L∞ bound -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["gpt2", "llama"])
@pytest.mark.parametrize("unit", ["mean_abs", "std", "absolute"])
def test_bound_holds_after_every_step(tiny_factory, family, unit):
    km = tiny_factory(family)
    name = value_location(km, 1)[0]
    w0 = km.model.get_parameter(name).detach().clone()
    scale = {"mean_abs": float(w0.abs().mean()), "std": float(w0.std()), "absolute": 1.0}[unit]
    bound = 0.02 if unit != "absolute" else 1e-3
    eps = bound * scale
    seen = []
    # lr far above ε, so the bound binds from the first step on
    editor = FineTuneEditor(layer=1, steps=6, lr=0.05, norm_bound=bound, bound_unit=unit, margin=50.0,
                            on_step=lambda record, weight: seen.append((record, weight.clone())))
    edit = editor.apply(km, [REQUEST])
    details = edit.report.details
    assert details.epsilon == pytest.approx(eps, rel=1e-6)
    assert details.weight_scale == pytest.approx(scale, rel=1e-6)
    assert len(seen) == len(details.history) == 7 and details.steps == 6 and not details.reached
    rounding = torch.finfo(torch.float32).eps * float(w0.abs().max())  # one float32 rounding of W0 + δ
    for (record, weight), kept in zip(seen, details.history):
        plain = float((weight.float() - w0.float()).abs().max())
        assert record == kept
        assert plain == pytest.approx(record.max_change, abs=1e-9)
        assert plain <= eps + rounding
    assert seen[0][1].equal(w0)  # step 0 is W0
    assert seen[-1][1].equal(km.model.get_parameter(name).detach())  # the weight returned is the last one seen
    assert details.history[-1].max_change == pytest.approx(eps, rel=1e-3)  # the bound binds
    edit.revert()


def test_without_bound_the_change_exceeds_it(tiny_factory):
    """The same run without a bound moves W far beyond the ε above: the bound test can fail."""
    km = tiny_factory("llama")
    w0 = km.model.get_parameter(value_location(km, 1)[0]).detach().clone()
    editor = FineTuneEditor(layer=1, steps=6, lr=0.05, norm_bound=math.inf, margin=50.0)
    edit = editor.apply(km, [REQUEST])
    assert edit.report.details.epsilon == math.inf
    assert edit.report.details.final.max_change > 5 * 0.02 * float(w0.abs().mean())
    edit.revert()


# ----- what changes, and reverting ----------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_only_the_declared_parameter_changes_and_revert_is_exact(tiny_factory, family):
    km = tiny_factory(family)
    state = snapshot(km)
    edit = FineTuneEditor(layer=1, steps=3, lr=1e-2).apply(km, [REQUEST])
    name = value_location(km, 1)[0]
    assert changed(km, state) == [name]
    assert [p.name for p in edit.report.parameters] == [name] and edit.report.parameters[0].whole
    assert edit.touched_parameters == [name]
    edit.revert()
    assert changed(km, state) == []
    assert ledger_for(km).touched_rows == {}


@pytest.mark.parametrize("family", ["gpt2", "llama"])
@pytest.mark.parametrize("order", ["ft-first", "kn-first"])
def test_stacked_with_a_knowledge_neuron_edit_reverts_in_both_orders(tiny_factory, family, order):
    km = tiny_factory(family)
    state = snapshot(km)
    ft = FineTuneEditor(layer=1, steps=3, lr=1e-2).apply(km, [REQUEST])
    after_ft = snapshot(km)
    kn = kn_edit.update_fact(km, list(PROMPTS[:1]), "Paris", "Tokyo", rule="paper",
                             neurons=[Neuron(1, 3), Neuron(1, 7)], force=True)
    assert changed(km, after_ft) == [value_location(km, 1)[0]]
    if order == "ft-first":
        ft.revert()
        kn.revert()
    else:
        kn.revert()
        assert changed(km, after_ft) == []  # back to the fine-tuned state exactly
        ft.revert()
    assert changed(km, state) == []
    assert ledger_for(km).touched_rows == {}


def test_the_delta_is_the_same_whatever_edit_sits_below(tiny_factory):
    """Reverting the knowledge-neuron edit below leaves pristine + the fine-tuning delta (additive ledger)."""
    km = tiny_factory("llama")
    state = snapshot(km)
    kn = kn_edit.update_fact(km, list(PROMPTS[:1]), "Paris", "Tokyo", rule="paper", neurons=[Neuron(1, 3)], force=True)
    ft = FineTuneEditor(layer=1, steps=3, lr=1e-2).apply(km, [REQUEST])
    kn.revert()
    name = value_location(km, 1)[0]
    delta = ft.patches[0].delta
    assert torch.equal(km.model.get_parameter(name).detach(), state[name] + delta)
    ft.revert()
    assert changed(km, state) == []


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_exception_inside_compute_leaves_the_model_untouched(tiny_factory, family):
    km = tiny_factory(family)
    state = snapshot(km)
    grads = [p.grad for p in km.model.parameters()]
    flags = [p.requires_grad for p in km.model.parameters()]

    class Boom(RuntimeError):
        pass

    def explode(record, weight):
        if record.step == 2:
            raise Boom("interrupted")

    with pytest.raises(Boom):
        FineTuneEditor(layer=1, steps=5, lr=1e-2, on_step=explode).apply(km, [REQUEST])
    assert changed(km, state) == []
    assert [p.grad for p in km.model.parameters()] == grads  # no gradients left on the model
    assert [p.requires_grad for p in km.model.parameters()] == flags
    assert ledger_for(km).active_edits == []


def test_runs_under_inference_mode(tiny_factory):
    """Lightning's loops may call editors under inference_mode; the optimisation still gets its gradients."""
    km = tiny_factory("llama")
    with torch.inference_mode():
        edit = FineTuneEditor(layer=1, steps=3, lr=1e-2).apply(km, [REQUEST])
    assert edit.report.details.steps == 3 and edit.report.details.final.max_change > 0
    edit.revert()


# ----- losses -----------------------------------------------------------------------------------------------
def plain_nll(km, prompt: str, target: str, which: str) -> float:
    """The mean NLL over the scored tokens of one prompt, one plain forward pass per token."""
    enc = km.encode(prompt, target)
    last = enc.steps[-1]
    full = torch.cat([last.input_ids, torch.tensor([last.target_id])])
    if which == "masked":  # new's tokens, teacher-forced
        pairs = [(full[: s.position + 1], s.target_id) for s in enc.steps]
    elif which == "full":  # every token of prompt + new after the first
        pairs = [(full[: j], int(full[j])) for j in range(1, len(full))]
    else:  # last: every token of new at the prompt's last position
        pairs = [(enc.steps[0].input_ids, t) for t in enc.target_ids]
    nll = []
    with torch.no_grad():
        for ids, target_id in pairs:
            logits = km.model(input_ids=ids[None]).logits[0, -1]
            nll.append(-float(torch.log_softmax(logits.double(), dim=-1)[target_id]))
    return sum(nll) / len(nll)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
@pytest.mark.parametrize("which", ["masked", "full", "last"])
def test_losses_equal_plain_nll(tiny_factory, family, which):
    km = tiny_factory(family)
    # Multi-token new objects and prompts of different lengths (padding), two requests jointly.
    requests = [EditRequest(PROMPTS, "Paris", "Danielle Darrieux"), EditRequest(("Tokyo is a city in",), "Japan", "Portugal")]
    assert len(km.encode(PROMPTS[0], "Danielle Darrieux").target_ids) > 1
    value, margins = finetune_loss(km, requests, which, layer=1)
    plain = [plain_nll(km, p, r.new, which) for r in requests for p in r.prompts]
    assert value == pytest.approx(sum(plain) / len(plain), rel=1e-5)
    n_checked = sum(len(km.encode(p, r.new).target_ids) for r in requests for p in r.prompts)
    assert margins.shape == (n_checked,)


def test_masked_and_last_differ_for_multi_token_objects(tiny_factory):
    km = tiny_factory("gpt2")
    request = [EditRequest(PROMPTS[:1], "Paris", "Danielle Darrieux")]
    assert finetune_loss(km, request, "masked")[0] != pytest.approx(finetune_loss(km, request, "last")[0])


def test_margins_are_the_report_margins(tiny_factory):
    """The early-stopping test measures what the edit report measures."""
    from kn_edit.editing.targets import margins as plain_margins

    km = tiny_factory("llama")
    _, margins = finetune_loss(km, [EditRequest(PROMPTS, "Paris", "Danielle Darrieux")], "full", layer=1)
    steps = [s for p in PROMPTS for s in km.encode(p, "Danielle Darrieux").steps]
    assert torch.allclose(margins, plain_margins(km, steps), atol=1e-5)


def test_masked_lm_needs_the_masked_loss(tiny_factory):
    km = tiny_factory("bert")
    request = EditRequest(("The capital of France is [MASK].",), "paris", "rome")
    with pytest.raises(EditError, match="loss=masked"):
        FineTuneEditor(layer=1).apply(km, [request])
    edit = FineTuneEditor(layer=1, loss="masked", steps=3, lr=1e-2).apply(km, [request])
    assert edit.report.details.steps >= 1
    edit.revert()


# ----- success ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["gpt2", "llama"])
@pytest.mark.parametrize("loss", ["full", "masked"])
def test_easy_target_succeeds_and_stops_early(tiny_factory, family, loss):
    km = tiny_factory(family)
    request = EditRequest(PROMPTS, "Paris", "Rome")
    # Tiny random models have flat logits (the final norm and 0.02-scale embeddings keep margins below ~0.5).
    edit = FineTuneEditor(layer=1, loss=loss, steps=200, lr=1e-2, norm_bound=10.0, margin=0.1).apply(km, [request])
    details = edit.report.details
    assert details.history[0].min_margin < 0  # the model did not predict Rome before
    assert details.reached and details.steps < 200
    assert details.history[-1].min_margin >= 0.1 and all(h.min_margin < 0.1 for h in details.history[:-1])
    assert edit.report.success and all(p.margin >= 0.1 - 1e-4 for p in edit.report.prompts)
    assert details.history[-1].loss < details.history[0].loss
    edit.revert()


def test_already_reached_takes_no_step(tiny_factory):
    km = tiny_factory("llama")
    edit = FineTuneEditor(layer=1, steps=200, lr=1e-2, norm_bound=10.0, margin=0.1).apply(km, [REQUEST])
    assert edit.report.details.reached
    again = FineTuneEditor(layer=1, steps=5, lr=1e-2, margin=0.1).compute(km, [REQUEST])[1]
    assert again.reached and again.steps == 0 and len(again.history) == 1
    edit.revert()


# ----- settings -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("key", "value"), [("steps", 0), ("steps", 2.5), ("lr", 0.0), ("lr", float("nan")),
                                            ("norm_bound", 0.0), ("norm_bound", -1.0), ("norm_bound", float("nan")),
                                            ("margin", -1.0), ("layer", -1), ("loss", "bogus"),
                                            ("bound_unit", "rms")])
def test_bad_settings_name_the_key(key, value):
    with pytest.raises(ConfigError, match=key):
        FineTuneEditor(**{key: value})


def test_unknown_setting_and_layer_out_of_range(tiny_factory):
    with pytest.raises(ConfigError, match="stepz"):
        FineTuneEditor(stepz=3)
    with pytest.raises(ConfigError, match="layer"):
        FineTuneEditor(layer=7).apply(tiny_factory("llama"), [REQUEST])


def test_registry_and_yaml_defaults():
    from omegaconf import OmegaConf

    assert isinstance(make_editor("ft"), FineTuneEditor) and make_editor("ft").name == "ft"
    ftm = make_editor("ft-m")
    assert ftm.settings.loss == FtLoss.masked and ftm.name == "ft-m"
    for name, preset in (("ft", {}), ("ft-m", {"loss": "masked"})):
        yaml = OmegaConf.to_container(OmegaConf.load(ROOT / "configs" / "methods" / f"{name}.yaml"))
        expected = {k: (v.value if hasattr(v, "value") else v) for k, v in vars(FineTuneSettings()).items()}
        assert yaml == {**expected, **preset}
        assert method_config(name, [ROOT / "configs" / "methods" / f"{name}.yaml"]) == method_config(name)
    with pytest.raises(ConfigError, match="loss"):
        method_config("ft", overrides=["loss=bogus"])
    assert method_config("ft", overrides=["norm_bound=.inf"]).norm_bound == math.inf


def test_weight_scale_and_default_layer(tiny_factory):
    w = torch.tensor([[1.0, -3.0], [2.0, -2.0]])
    assert weight_scale(w, "mean_abs") == pytest.approx(2.0)
    assert weight_scale(w, "std") == pytest.approx(float(torch.tensor([1.0, -3.0, 2.0, -2.0]).std()))
    assert weight_scale(w, "absolute") == 1.0
    km = tiny_factory("gpt2")
    assert default_layer(km) == 0
    km.name = "smollm2-135m"
    from kn_edit.editing.finetune import MODEL_LAYERS

    assert default_layer(km) == MODEL_LAYERS["smollm2-135m"]


def test_patch_file_round_trip(tiny_factory, tmp_path):
    """A fine-tuning edit saved as a patch file applies to the pristine model and reverts bit for bit."""
    km = tiny_factory("gpt2")
    state = snapshot(km)
    edit = FineTuneEditor(layer=1, steps=3, lr=1e-2).apply(km, [REQUEST])
    edited = snapshot(km)
    edit.save(tmp_path / "ft.kn-patch")
    edit.revert()
    applied = kn_edit.apply_patch(km, tmp_path / "ft.kn-patch")
    assert changed(km, edited) == []
    applied.revert()
    assert changed(km, state) == []
