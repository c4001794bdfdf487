"""The evaluation loop end to end on tiny models: every metric present, the model bit for bit unchanged,
editor failures counted, the same numbers under the DDP strategy on two CPU processes."""

from __future__ import annotations

import json
import math
from typing import Sequence

import pytest
import torch

from kn_edit.data.records import FactRecord, FactSet
from kn_edit.editing.base import Edit, Editor, EditRequest, ParamPatch
from kn_edit.errors import EditError
from kn_edit.evaluation import EvalConfig, evaluate
from kn_edit.evaluation.report import SUMMARY
from kn_edit.neurons import Neuron

SUBJECTS = [("France", "Paris"), ("Italy", "Rome"), ("Japan", "Tokyo"), ("Germany", "Berlin"), ("Spain", "Madrid"),
            ("Portugal", "Lisbon")]  # fmt: skip
LANGUAGES = [("France", "French"), ("Italy", "Italian"), ("Dante", "Italian"), ("Paris", "French")]
PASSAGES = ["The Eiffel Tower is in Paris, France.", "Rome is located in Italy. Tokyo is a city in Japan."]


def tiny_facts() -> FactSet:
    records = [
        FactRecord(f"capital:{s}", s, "capital", o, (f"The capital of {s} is", f"{s}'s capital is"), (f"The capital city of {s} is",))
        for s, o in SUBJECTS
    ] + [
        FactRecord(f"language:{s}", s, "language", o, (f"The official language of {s} is",), ())
        for s, o in LANGUAGES
    ]  # fmt: skip
    return FactSet("tiny", records)


class ValueVectorEditor(Editor):
    """A small real editor for the tests: for the request's first prompt, the last layer's most active neuron
    at the answer position gets ``scale`` · sign(a) · (E(new) − E(old)) / |a| added to its value vector."""

    name = "value-vector"

    def __init__(self, scale: float = 20.0, fail_on: Sequence[str] = ()) -> None:
        self.scale = scale
        self.fail_on = set(fail_on)

    def apply(self, km, requests: Sequence[EditRequest]) -> Edit:
        layer = km.n_layers - 1
        param = km.value_weight(layer)
        name = next(n for n, p in km.model.named_parameters() if p is param)
        dim = 0 if km.adapter.value_weight_transposed else 1  # the axis that indexes neurons
        patches, neurons = [], []
        for request in requests:
            if request.subject in self.fail_on:
                raise EditError(f"refusing to edit {request.subject}")
            old, new = km.encode(request.prompts[0], request.old), km.encode(request.prompts[0], request.new)
            act = km.activations(old.steps[:1], [layer])[0, 0]  # [d_ff]
            i = int(act.abs().argmax())
            direction = km.output_embedding([new.target_ids[0]]) - km.output_embedding([old.target_ids[0]])
            index = torch.tensor([i])
            before = param.detach().index_select(dim, index).clone().cpu()
            with torch.no_grad():
                km.value_vectors(layer)[i] += (self.scale * torch.sign(act[i]) / act[i].abs().clamp(min=1e-3)) * direction[0]
            patches.append(ParamPatch(name, dim, index, before, param.detach().index_select(dim, index).clone().cpu()))
            neurons.append(Neuron(layer, i))
        return Edit(self.name, tuple(requests), patches, km, info={"neurons": neurons, "scale": self.scale})


def tiny_config(tmp_path, **overrides) -> EvalConfig:
    config = EvalConfig(name="tiny", output_dir=str(tmp_path), run_name="run")
    config.data.only_known = False  # a random tiny model knows no fact
    config.data.neighbours = 2
    config.probe.steps = 2
    config.trainer.accelerator = "cpu"
    for key, value in overrides.items():
        section, _, field = key.partition(".")
        setattr(getattr(config, section), field, value)
    return config


def snapshot(km) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in km.model.state_dict().items()}


def assert_unchanged(km, before: dict[str, torch.Tensor]) -> None:
    after = km.model.state_dict()
    assert after.keys() == before.keys()
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert not changed, f"parameters changed by the run: {changed}"


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_tiny_run_has_every_metric_and_leaves_the_model_unchanged(tiny_factory, tmp_path, family):
    km = tiny_factory(family)
    before = snapshot(km)
    result = evaluate(tiny_config(tmp_path), km=km, editor=ValueVectorEditor(), facts=tiny_facts(), passages=PASSAGES)
    assert_unchanged(km, before)
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
    """Declares its patch at the wrong neuron, so revert() does not undo the change."""

    def apply(self, km, requests):
        edit = super().apply(km, requests)
        for patch in edit.patches:
            patch.index = (patch.index + 1) % km.d_ff
            patch.before = km.model.get_parameter(patch.name).detach().index_select(patch.dim, patch.index).clone()
        return edit


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
    assert_unchanged(km, before)
    assert result.metrics["edit/n_facts"] == 6 and result.metrics["generalization/n_facts"] == 4
    assert not any(k.startswith("drift/") for k in result.metrics)  # causal-LM perplexity only
    assert math.isfinite(result.metrics["probe/suppressed"])
