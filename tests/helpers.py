"""Helpers shared by the test modules: snapshots of a model's weights and bit-for-bit comparisons with them,
hook counts, snapshots of folders, the knowledge-neuron rule tests' raw reads of value vectors, a patch file's
metadata made to match changed tensors, and the tiny evaluation world (facts, passages, a small real editor,
a quick config). Test modules import these from here, never from one another.

Tiny models themselves are built by ``tiny_models``; ``plain_values`` and ``reference_attribution`` are the
independent slow references the numbers are checked against."""

from __future__ import annotations

import importlib.util
import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Sequence

import torch

from kn_edit.data.records import FactRecord, FactSet
from kn_edit.editing.base import Editor, EditRequest
from kn_edit.editing.values import value_changes
from kn_edit.errors import EditError
from kn_edit.models.neurons import Neuron


# ----- weights: snapshots and bit-for-bit comparisons -------------------------------------------------------
def model_tensors(km) -> dict[str, torch.Tensor]:
    """Every parameter and buffer of ``km``'s model, under every name it has (a tied weight under each)."""
    model = km.model
    return {**dict(model.named_parameters(remove_duplicate=False)), **dict(model.named_buffers(remove_duplicate=False))}


def snapshot(km) -> dict[str, torch.Tensor]:
    """Copies of every parameter and buffer of ``km``'s model, by name."""
    return {name: t.detach().clone() for name, t in model_tensors(km).items()}


def bit_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    """The same dtype, shape and bytes (so -0.0 is not 0.0), and equal by torch.equal (so no NaN)."""
    if a.dtype != b.dtype or a.shape != b.shape or a.device != b.device:
        return False
    bits = [t.detach().reshape(-1).contiguous().view(torch.uint8) for t in (a, b)]
    return torch.equal(bits[0], bits[1]) and torch.equal(a, b)


def differences(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor]) -> list[str]:
    """The sorted names whose tensors are not bit for bit the same, or that only one side has."""
    return sorted(name for name in before.keys() | after.keys()
                  if name not in before or name not in after or not bit_equal(before[name], after[name]))  # fmt: skip


def changed(km, before: dict[str, torch.Tensor]) -> list[str]:
    """The sorted names of ``km``'s parameters and buffers that are not bit for bit as in ``before``."""
    return differences(before, model_tensors(km))


def same(km, before: dict[str, torch.Tensor]) -> bool:
    """Every parameter and buffer of ``km``'s model is bit for bit as in ``before`` (a snapshot)."""
    return not changed(km, before)


def assert_same(km, before: dict[str, torch.Tensor]) -> None:
    """``same``, failing with the names that changed."""
    diff = changed(km, before)
    assert not diff, f"changed: {diff}"


# ----- hooks --------------------------------------------------------------------------------------------------
def hook_count(km) -> int:
    """Hooks of every kind (forward, forward-pre, backward, backward-pre) on every module of ``km``'s model."""
    return sum(len(m._forward_pre_hooks) + len(m._forward_hooks) + len(m._backward_hooks) + len(m._backward_pre_hooks)
               for m in km.model.modules())  # fmt: skip


# ----- folders ------------------------------------------------------------------------------------------------
def file_tree(root: Path) -> dict[str, bytes | None]:
    """Every file (its bytes) and folder (None) under ``root``, by relative path."""
    return {str(p.relative_to(root)): None if p.is_dir() else p.read_bytes() for p in sorted(root.rglob("*"))}


# ----- value vectors read from the raw modules (the knowledge-neuron rule tests) ------------------------------
RULE_NEURONS = [Neuron(0, 3), Neuron(1, 5), Neuron(1, 7)]


def new_object(km) -> str:
    """The new object the edit tests write, in the model's convention."""
    return "rome" if km.is_masked_lm else "Rome"


def neuron_slice(km, w: torch.Tensor, index: int) -> torch.Tensor:
    """Value vector ``index`` of a tensor shaped like a value projection's weight (or its gradient)."""
    return w[index] if w.shape[0] == km.d_ff and w.shape[1] == km.d_model else w[:, index]


def raw_value(km, n: Neuron) -> torch.Tensor:
    """A copy of neuron ``n``'s value vector, read from the raw value projection, not through kn_edit."""
    return neuron_slice(km, km.value_proj(n.layer).weight, n.index).detach().clone()


def assert_only_neurons_changed(km, before, neurons, expected: dict[Neuron, torch.Tensor], atol=1e-6) -> None:
    """Only the value projections changed, in them only ``neurons``' value vectors, each to its ``expected``
    vector (within ``atol``); every other parameter and buffer is bit for bit as in ``before``."""
    edited = {(n.layer, n.index) for n in neurons}
    projections = {}
    for name, p in km.model.named_parameters(remove_duplicate=False):
        layer = next((l for l in range(km.n_layers) if km.value_proj(l).weight is p), None)
        if layer is not None:
            projections[name] = layer
    assert set(changed(km, before)) <= set(projections), f"changed: {sorted(set(changed(km, before)) - set(projections))}"
    for name, layer in projections.items():
        for i in range(km.d_ff):
            now, was = raw_value(km, Neuron(layer, i)), neuron_slice(km, before[name], i)
            if (layer, i) in edited:
                torch.testing.assert_close(now, expected[Neuron(layer, i)], atol=atol, rtol=1e-5)
            else:
                assert bit_equal(now, was), f"value vector {layer}:{i} changed"


# ----- patch files ---------------------------------------------------------------------------------------------
def redigest(meta: dict, tensors: dict[str, torch.Tensor]) -> dict:
    """A copy of a patch's metadata whose recorded dtype, shape and digest match ``tensors`` (so that only the
    other checks can refuse it)."""
    from kn_edit.editing.patchfile import tensor_digest

    meta = json.loads(json.dumps(meta))
    for i, p in enumerate(meta["params"]):
        for k, m in p["tensors"].items():
            t = tensors[f"{i}.{k}"]
            m.update(dtype=str(t.dtype), shape=list(t.shape), sha256=tensor_digest(t))
    return meta


# ----- the tiny evaluation world --------------------------------------------------------------------------------
SUBJECTS = [("France", "Paris"), ("Italy", "Rome"), ("Japan", "Tokyo"), ("Germany", "Berlin"), ("Spain", "Madrid"),
            ("Portugal", "Lisbon")]  # fmt: skip
LANGUAGES = [("France", "French"), ("Italy", "Italian"), ("Dante", "Italian"), ("Paris", "French")]
PASSAGES = ["The Eiffel Tower is in Paris, France.", "Rome is located in Italy. Tokyo is a city in Japan."]


def tiny_facts() -> FactSet:
    """The capitals of SUBJECTS (with held-out prompts) and the languages of LANGUAGES (without)."""
    records = [
        FactRecord(f"capital:{s}", s, "capital", o, (f"The capital of {s} is", f"{s}'s capital is"), (f"The capital city of {s} is",))
        for s, o in SUBJECTS
    ] + [
        FactRecord(f"language:{s}", s, "language", o, (f"The official language of {s} is",), ())
        for s, o in LANGUAGES
    ]  # fmt: skip
    return FactSet("tiny", records)


def write_capital_facts(path: Path, subjects: Sequence[tuple[str, str]] = SUBJECTS) -> Path:
    """A facts.jsonl of ``subjects``' capitals, each with one prompt and one held-out prompt."""
    path.write_text("".join(json.dumps({"subject": s, "relation": "capital", "object": o, "prompts": ["The capital of [X] is"],
                                        "heldout_prompts": ["[X]'s capital is"]}) + "\n" for s, o in subjects))  # fmt: skip
    return path


def write_pararel(root, patterns: dict[str, list[str]], facts: dict[str, list[tuple[str, str]]]):
    """A ParaRel-like folder: patterns/REL.jsonl and facts/REL.jsonl (uuid REL-i)."""
    (root / "patterns").mkdir(parents=True)
    (root / "facts").mkdir()
    for rel, pats in patterns.items():
        (root / "patterns" / f"{rel}.jsonl").write_text("".join(json.dumps({"pattern": p}) + "\n" for p in pats))
    for rel, items in facts.items():
        lines = [json.dumps({"sub_label": s, "obj_label": o, "uuid": f"{rel}-{i}"}) for i, (s, o) in enumerate(items)]
        (root / "facts" / f"{rel}.jsonl").write_text("\n".join(lines) + "\n")
    return root


@dataclass
class ValueVectorSettings:
    scale: float = 20.0
    fail_on: list[str] = field(default_factory=list)


@dataclass
class ValueVectorDetails:
    neurons: list[Neuron]
    scale: float


class ValueVectorEditor(Editor):
    """A small real editor for the tests: for the request's first prompt, the last layer's most active neuron
    at the answer position gets ``scale`` · sign(a) · (E(new) − E(old)) / |a| added to its value vector.
    Configs name it "helpers:ValueVectorEditor"."""

    name = "value-vector"
    config_class = ValueVectorSettings

    def __init__(self, settings: ValueVectorSettings | None = None, *, reporter=None, **overrides) -> None:
        self.settings = replace(settings or ValueVectorSettings(), **overrides)

    def compute(self, km, requests: Sequence[EditRequest]):
        layer = km.n_layers - 1
        neurons, deltas = [], []
        for request in requests:
            if request.subject in self.settings.fail_on:
                raise EditError(f"refusing to edit {request.subject}")
            old, new = km.encode(request.prompts[0], request.old), km.encode(request.prompts[0], request.new)
            act = km.activations(old.steps[:1], [layer])[0, 0]  # [d_ff]
            i = int(act.abs().argmax())
            direction = km.output_embedding([new.target_ids[0]]) - km.output_embedding([old.target_ids[0]])
            neurons.append(Neuron(layer, i))
            deltas.append((self.settings.scale * torch.sign(act[i]) / act[i].abs().clamp(min=1e-3)) * direction[0])
        changes = value_changes(km, neurons, torch.stack(deltas).detach().float().cpu(), additive=True)
        return changes, ValueVectorDetails(neurons, self.settings.scale)


def tiny_sized(config):
    """An evaluation or comparison config made quick for tiny random models, on the CPU."""
    config.data.only_known = False  # a random tiny model knows no fact
    config.data.neighbours = 2
    config.probe.steps = 2
    config.trainer.accelerator = "cpu"
    return config


def tiny_config(tmp_path, **overrides):
    """A quick EvalConfig writing run "run" under ``tmp_path``; ``overrides`` by "section.field"."""
    from kn_edit.evaluation import EvalConfig

    config = tiny_sized(EvalConfig(name="tiny", output_dir=str(tmp_path), run_name="run"))
    for key, value in overrides.items():
        section, _, name = key.partition(".")
        setattr(getattr(config, section), name, value)
    return config


# ----- the field's benchmarks, hand-built in each format's shape (readers are tested on files apart) ----------
def benchmark_cases() -> dict[str, list]:
    """A few BenchmarkCases per source (counterfact, zsre, knowedit, mquake) on the tiny corpus' words."""
    from kn_edit.data.records import BenchmarkCase, Probe

    def request(subject, old, new, prompt="The capital of {} is", relation="P36"):
        return EditRequest((prompt.format(subject),), old=old, new=new, subject=subject, relation=relation)

    counterfact = [
        BenchmarkCase("0", "counterfact", (request("France", "Paris", "Rome"),), (
            Probe("paraphrase", ("France's capital is", "The capital city of France is"), "Rome", contrast="Paris"),
            Probe("neighborhood", ("The Eiffel Tower is in",), "Paris", contrast="Rome"),
            Probe("attribute", ("Rome is located in",), "Rome")),
            generation_prompts=("France is", "The story of France"),
            reference_texts=("Rome is located in Italy.", "The capital of Italy is Rome.")),
        BenchmarkCase("1", "counterfact", (request("Japan", "Tokyo", "Berlin"),), (
            Probe("paraphrase", ("Japan's capital is",), "Berlin", contrast="Tokyo"),
            Probe("neighborhood", ("Tokyo is a city in", "The capital of Japan is"), "Tokyo", contrast="Berlin")),
            generation_prompts=("Japan was",)),  # no reference text: its RS is missing
        BenchmarkCase("2", "counterfact", (request("Italy", "Rome", "Madrid"),), (
            Probe("paraphrase", ("Italy's capital is",), "Madrid", contrast="Rome"),
            Probe("neighborhood", ("Dante was born in",), "Rome", contrast="Madrid")),
            generation_prompts=("Italy is",), reference_texts=("Madrid, Spain, is a capital.",)),
    ]  # fmt: skip
    zsre = [
        BenchmarkCase("z0", "zsre", (request("France", "Paris", "Lisbon", "What is the capital of {}?"),), (
            Probe("paraphrase", ("Which city is the capital of France?",), "Lisbon"),
            Probe("locality", ("The mother tongue of Dante is",), "Italian"))),
        BenchmarkCase("z1", "zsre", (request("Spain", "Madrid", "Tokyo", "What is the capital of {}?"),), (
            Probe("paraphrase", ("Spain's capital city is",), "Tokyo"),
            Probe("locality", ("Berlin is the capital of",), "Germany"))),
    ]  # fmt: skip
    knowedit = [
        BenchmarkCase("k0", "knowedit", (request("Italy", "Rome", "Paris"),), (
            Probe("paraphrase", ("Italy's capital is",), "Paris"),
            Probe("locality", ("The official language of France is",), "French", label="Relation_Specificity"),
            Probe("locality", ("Tokyo is a city in",), "Japan", label="Forgetfulness"),
            Probe("portability", ("The Eiffel Tower is in",), "Italy", label="Logical_Generalization"),
            Probe("portability", ("The capital of the country of Dante is",), "Paris", label="Subject_Aliasing"))),
        BenchmarkCase("k1", "knowedit", (request("Germany", "Berlin", "Madrid"),), (
            Probe("paraphrase", ("Germany's capital is",), "Madrid"),
            Probe("locality", ("Rome is located in",), "Italy", label="Relation_Specificity"),
            Probe("portability", ("Madrid is the capital of",), "Germany", label="Logical_Generalization"))),
    ]  # fmt: skip
    mquake = [
        BenchmarkCase("m0", "mquake", (request("France", "Paris", "Rome"),
                                       request("Rome", "Italy", "Spain", "{} is located in", "P17")), (
            Probe("multihop", ("The capital of France is located in", "France's capital is a city in"), "Spain",
                  aliases=("Espana",), before="France", before_aliases=("the French Republic",)),)),
        BenchmarkCase("m1", "mquake", (request("Japan", "Tokyo", "Berlin"),), (
            Probe("multihop", ("The capital of Japan is the capital of",), "Germany", before="Japan"),)),
    ]  # fmt: skip
    return {"counterfact": counterfact, "zsre": zsre, "knowedit": knowedit, "mquake": mquake}


def evaluation_script(name: str):
    """evaluations/NAME.py imported as a module (the scripts are not a package)."""
    path = Path(__file__).resolve().parents[1] / "evaluations" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
