"""Bad input through the CLI entry point, in process: every case exits 2 with one line on stderr and no
traceback, and leaves every file (models, patches, data, the cache) byte for byte as it was.

To add a case, append a ``Case`` to CASES: argv (``{name}`` placeholders are paths of the WORLD files built
below, ``{w}`` the world folder itself) and a fragment the message must contain. Cases that need a file of
their own add a ``setup(world) -> None`` that writes it under the world folder before the snapshot. Cases with
``before_load`` must be refused before any model is loaded (``kn_edit.load`` fails the test if called).
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest
import torch

import kn_edit
from helpers import assert_same, file_tree, redigest, snapshot
from kn_edit import Neuron
from kn_edit.cli import main
from tiny_models import build_model

PROMPT = "The capital of France is"
EDIT = ["-p", PROMPT, "--old", "Paris", "--new", "Rome", "--force", "--neurons", "1:5,1:7", "--quiet",
        "on_failure=apply", "solve_steps=1"]


# ----- the world: files the cases read ---------------------------------------------------------------------
def _rewrite_patch(src: Path, dst: Path, edit_tensors=None, edit_meta=None, raw_meta: str | None = None) -> None:
    """Copy patch ``src`` to ``dst``, changing tensors (dict → dict) and/or the metadata (dict → dict)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(src), framework="pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    if edit_tensors:
        tensors = edit_tensors(tensors)
    if raw_meta is not None:
        meta["kn_edit_patch"] = raw_meta
    elif edit_meta:
        meta["kn_edit_patch"] = json.dumps(edit_meta(json.loads(meta["kn_edit_patch"])))
    save_file(tensors, str(dst), metadata=meta)


def _flip_last_byte(src: Path, dst: Path) -> None:
    data = bytearray(src.read_bytes())
    (n,) = struct.unpack("<Q", bytes(data[:8]))
    assert len(data) > 8 + n  # the last byte belongs to a tensor, not to the header
    data[-1] ^= 0x01
    dst.write_bytes(bytes(data))


def _tampered(world: Path, name: str, **kw) -> Path:
    dst = world / f"{name}.safetensors"
    _rewrite_patch(world / "patch.safetensors", dst, **kw)
    return dst


def _with_tensor(key: str, fn: Callable[[torch.Tensor], torch.Tensor], follow: bool):
    """(edit_tensors, edit_meta) replacing tensor ``key`` by fn(it); ``follow``: the metadata follows it."""
    state: dict = {}

    def tensors(ts: dict) -> dict:
        ts = dict(ts)
        ts[key] = fn(ts[key])
        state["ts"] = ts
        return ts

    def meta(m: dict) -> dict:
        return redigest(m, state["ts"]) if follow else m

    return tensors, meta


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    """A tiny saved model, an erased copy (value vectors 1:5 and 1:7 zero), a patch of the model, a 3-layer
    model, an evaluation config over a Latin-1 fact file, and malformed YAML files."""
    w = tmp_path_factory.mktemp("world")
    model, tok = build_model("llama")
    km = kn_edit.wrap(model, tok, name="tiny")
    km.save(w / "model")
    edit = kn_edit.update_fact(km, [PROMPT], "Paris", "Rome", rule="paper", neurons=[Neuron(1, 5), Neuron(1, 7)],
                               force=True)
    edit.save(w / "patch.safetensors")
    edit.revert()
    kn_edit.erase_fact(km, [PROMPT], "Paris", neurons=[Neuron(1, 5), Neuron(1, 7)], force=True)
    km.save(w / "erased")
    model3, tok3 = build_model("llama", n_layers=3)
    kn_edit.wrap(model3, tok3, name="tiny3").save(w / "model3")
    other, tok_o = build_model("llama", seed=1)
    kn_edit.wrap(other, tok_o, name="other").save(w / "other")

    (w / "bad.yaml").write_text("update:\n  margin: [1\n")
    (w / "list.yaml").write_text("- update.margin=2\n- 3\n")
    (w / "a-file").write_text("not a folder\n")
    (w / "existing").mkdir()
    (w / "latin1.jsonl").write_bytes(
        json.dumps({"subject": "Japan", "relation": "capital", "object": "Tokyo",
                    "prompts": ["The capital of [X] is"]}).encode() + b"\n"
        + '{"subject": "Fran\u00e7e", "relation": "capital", "object": "Paris", "prompts": ["[X]"]}\n'.encode("latin-1")
    )
    (w / "text.txt").write_text("Paris is the capital of France. Rome is the capital of Italy.\n")
    (w / "plot.png").write_bytes(b"\x89PNG\r\n\x1a\n the user's own picture")
    (w / "eval.yaml").write_text(f"""
name: bad
model: {w / "model"}
data: {{source: jsonl, path: {w / "latin1.jsonl"}, only_known: false}}
text: {{source: file, path: {w / "text.txt"}, passages: 1}}
trainer: {{accelerator: cpu}}
output_dir: {w / "runs"}
""")

    # patch files damaged in every way the reader must notice
    _flip_last_byte(w / "patch.safetensors", w / "flipped.safetensors")
    for name, key, fn, follow in [
        ("fp16", "0.after", lambda t: t.half(), False),
        ("bool", "0.after", lambda t: t.bool(), True),
        ("int", "0.after", lambda t: t.to(torch.int32), True),
        ("nan", "0.after", lambda t: torch.full_like(t, float("nan")), True),
        ("inf", "0.before", lambda t: torch.full_like(t, float("inf")), True),
        ("index-far", "0.index", lambda t: t + 10_000, True),
        ("index-negative", "0.index", lambda t: -t - 1, True),
        ("index-float", "0.index", lambda t: t.float(), True),
        ("index-repeated", "0.index", lambda t: torch.zeros_like(t), True),
    ]:
        tensors, meta = _with_tensor(key, fn, follow)
        _tampered(w, name, edit_tensors=tensors, edit_meta=meta)
    _tampered(w, "not-json", raw_meta="{not json")
    _tampered(w, "no-params", edit_meta=lambda m: {k: v for k, v in m.items() if k != "params"})
    _tampered(w, "params-string", edit_meta=lambda m: {**m, "params": "all of them"})
    _tampered(w, "fingerprint-list", edit_meta=lambda m: {**m, "fingerprint": [1, 2]})
    _tampered(w, "dim-far", edit_meta=lambda m: {**m, "params": [{**p, "dim": 7} for p in m["params"]]})
    _tampered(w, "dim-float", edit_meta=lambda m: {**m, "params": [{**p, "dim": 0.5} for p in m["params"]]})
    _tampered(w, "version-99", edit_meta=lambda m: {**m, "version": 99})
    _tampered(w, "no-digest", edit_meta=lambda m: {**m, "params": [
        {**p, "tensors": {k: {kk: vv for kk, vv in t.items() if kk != "sha256"} for k, t in p["tensors"].items()}}
        for p in m["params"]]})
    _tampered(w, "missing-tensor", edit_tensors=lambda ts: {k: v for k, v in ts.items() if k != "0.before"})
    (w / "not-a-patch.safetensors").write_bytes(b"\x00" * 64)
    return w


@dataclass
class Case:
    id: str
    argv: list[str]
    fragment: str
    setup: Callable[[Path], None] | None = None
    skip: Callable[[], str | None] | None = None  # a reason to skip on this machine, or None
    before_load: bool = False  # refused before any model is loaded


def _unwritable_skip() -> str | None:
    try:
        os.mkdir("/sys/kn-edit-write-test")
    except OSError:
        return None
    os.rmdir("/sys/kn-edit-write-test")
    return "/sys is writable here"


def _earlier_run(world: Path) -> None:
    """An earlier evaluation's folder (runs/taken) and a stopped sequential run's progress (runs/stopped...)."""
    (world / "runs" / "taken").mkdir(parents=True, exist_ok=True)
    (world / "runs" / "taken" / "metrics.json").write_text('{"metrics": {"edit/top1": 0.5}}')
    (world / "runs" / "stopped.progress.json").write_text('{"edits_made": 7}')


def _apply(patch: str, fragment: str, model: str = "{model}") -> Case:
    return Case(f"patch-{patch}", ["apply-patch", "-m", model, "--patch", f"{{w}}/{patch}.safetensors"], fragment)


CASES: list[Case] = [
    # configuration
    Case("yaml-syntax", ["update-fact", "-m", "{model}", *EDIT, "--config", "{w}/bad.yaml"], "bad.yaml:3:1: not valid YAML"),
    Case("yaml-list", ["update-fact", "-m", "{model}", *EDIT, "--config", "{w}/list.yaml"], "must be a mapping"),
    Case("yaml-missing", ["update-fact", "-m", "{model}", *EDIT, "--config", "{w}/nope.yaml"], "config file not found"),
    Case("unknown-key", ["update-fact", "-m", "{model}", *EDIT, "nope=1"], "nope"),
    Case("bad-choice", ["update-fact", "-m", "{model}", *EDIT, "rule=magic"], "rule: Invalid value 'magic'"),
    Case("bad-type", ["update-fact", "-m", "{model}", *EDIT, "margin=wide"], "margin"),
    Case("unknown-method", ["update-fact", "-m", "{model}", *EDIT, "--method", "romeo"], "unknown method 'romeo'"),
    Case("not-an-editor", ["update-fact", "-m", "{model}", *EDIT, "--method", "os:path"], "not an editor"),
    Case("method-cannot-erase", ["erase-fact", "-m", "{model}", "-p", PROMPT, "-t", "Paris", "--method", "kn"],
         "cannot erase"),
    Case("neurons-for-rome", ["update-fact", "-m", "{model}", "-p", PROMPT, "--old", "Paris", "--new", "Rome",
                              "--method", "rome", "--neurons", "1:5"], "--neurons applies"),
    Case("kn-subject-unknown-fact", ["update-fact", "-m", "{model}", "-p", PROMPT, "--old", "Paris", "--new", "Rome",
                                     "--method", "kn-subject", "--quiet"], "does not predict 'Paris'"),
    Case("no-subject-found", ["update-fact", "-m", "{model}", "-p", PROMPT, "-p", "Rome is located in", "--old",
                              "Paris", "--new", "Rome", "--quiet"], "no subject found"),
    Case("kn-subject-subject-not-in-prompt", ["update-fact", "-m", "{model}", "-p", PROMPT, "--old", "Paris", "--new",
                                              "Rome", "--method", "kn-subject", "--subject", "Germany", "--quiet",
                                              "--force"],
         "'Germany' does not occur in prompt"),
    Case("kn-subject-neurons", ["update-fact", "-m", "{model}", "-p", PROMPT, "--old", "Paris", "--new", "Rome",
                                "--subject", "France", "--quiet", "--method", "kn-subject", "neurons=0"],
         "neurons must be >= 1"),
    Case("max-text-change", ["update-fact", "-m", "{model}", *EDIT, "max_text_change=0"], "max_text_change"),
    # NaN and infinities: refused by name when the settings are built (configuration.check_finite, ui.FiniteFloat)
    Case("margin-nan", ["update-fact", "-m", "{model}", *EDIT, "margin=nan"], "margin must be a finite number, got nan"),
    Case("ridge-inf", ["update-fact", "-m", "{model}", *EDIT, "ridge=inf"], "ridge must be a finite number, got inf"),
    Case("max-change-minus-inf", ["update-fact", "-m", "{model}", *EDIT, "max_change=-.inf"],
         "max_change must be a finite number, got -inf"),
    Case("rome-lr-nan", ["update-fact", "-m", "{model}", "-p", PROMPT, "--old", "Paris", "--new", "Rome", "--method",
                         "rome", "lr=nan"], "lr must be a finite number, got nan"),
    Case("memit-weight-inf", ["update-fact", "-m", "{model}", "-p", PROMPT, "--old", "Paris", "--new", "Rome",
                              "--subject", "France", "--method", "memit", "mom2_update_weight=.inf"],
         "mom2_update_weight must be a finite number, got inf"),
    Case("ft-norm-bound-nan", ["update-fact", "-m", "{model}", "-p", PROMPT, "--old", "Paris", "--new", "Rome",
                               "--method", "ft", "norm_bound=nan"], "norm_bound must be a number (.inf allowed), got nan"),
    Case("locate-share-step-nan", ["locate", "-m", "{model}", "-p", PROMPT, "-t", "Paris", "share_step=nan"],
         "share_step must be a finite number, got nan"),
    Case("trace-noise-nan", ["trace", "-m", "{model}", "-p", PROMPT, "-s", "France", "-t", "Paris", "--noise-scale",
                             "nan"], "--noise-scale must be a finite number, got nan"),
    Case("probe-factor-inf", ["probe", "-m", "{model}", "-p", PROMPT, "-t", "Paris", "--neurons", "1:5", "--factor",
                              "inf"], "--factor must be a finite number, got inf"),
    Case("eval-tolerance-inf", ["evaluate", "--quiet", "--config", "{w}/eval.yaml", "regression.tolerances={edit/top1: .inf}"],
         "regression.tolerances.edit/top1 must be a finite number, got inf"),
    Case("eval-fraction-nan", ["evaluate", "--quiet", "--config", "{w}/eval.yaml", "data.heldout_fraction=nan"],
         "data.heldout_fraction must be a finite number, got nan"),
    Case("eval-method-margin-nan", ["evaluate", "--quiet", "--config", "{w}/eval.yaml", "editor.settings.margin=.nan"],
         "editor: margin must be a finite number, got nan"),
    Case("old-equals-new", ["update-fact", "-m", "{model}", "-p", PROMPT, "--old", "Paris", "--new", "Paris"], "same"),
    Case("not-predicted", ["update-fact", "-m", "{model}", "-p", PROMPT, "--old", "Paris", "--new", "Rome",
                           "--neurons", "1:5", "--quiet"], "--force"),
    Case("device", ["update-fact", "-m", "{model}", "--device", "cuda:7", *EDIT], "cuda:7",
         skip=lambda: "CUDA is available" if torch.cuda.is_available() else None),
    Case("device-unknown", ["update-fact", "-m", "{model}", "--device", "gpu9", *EDIT], "unknown device"),
    # save targets, checked before the edit runs
    Case("save-existing", ["update-fact", "-m", "{model}", *EDIT, "--save", "{w}/existing"], "already exists"),
    Case("save-source", ["update-fact", "-m", "{model}", *EDIT, "--save", "{model}"], "loaded from"),
    Case("save-unwritable", ["update-fact", "-m", "{model}", *EDIT, "--save", "/sys/kn-edit-test/out"],
         "not writable", skip=_unwritable_skip),
    Case("save-patch-unwritable", ["update-fact", "-m", "{model}", *EDIT, "--save-patch", "/sys/kn-edit-test.st"],
         "not writable", skip=_unwritable_skip),
    Case("save-under-a-file", ["erase-fact", "-m", "{model}", "-p", PROMPT, "-t", "Paris", "--force", "--neurons",
                               "1:5", "--save", "{w}/a-file/out"], "is not a folder"),
    Case("save-patch-existing", ["update-fact", "-m", "{model}", *EDIT, "--save-patch", "{w}/patch.safetensors"],
         "already exists"),
    # pictures and output folders named by the user, checked before the model loads
    Case("locate-plot-existing", ["locate", "-m", "{model}", "-p", PROMPT, "-t", "Paris", "--plot", "{w}/plot.png"],
         "plot.png already exists; choose a new path, or pass --overwrite to replace it", before_load=True),
    Case("trace-plot-existing", ["trace", "-m", "{model}", "-p", PROMPT, "-s", "France", "-t", "Paris", "--plot",
                                 "{w}/plot.png"], "pass --overwrite", before_load=True),
    Case("trace-plot-extension", ["trace", "-m", "{model}", "-p", PROMPT, "-s", "France", "-t", "Paris", "--plot",
                                  "{w}/new.txt"], "extension must name a format, one of", before_load=True),
    Case("locate-plot-no-extension", ["locate", "-m", "{model}", "-p", PROMPT, "-t", "Paris", "--plot",
                                      "{w}/heatmap"], "extension must name a format", before_load=True),
    Case("locate-plot-folder", ["locate", "-m", "{model}", "-p", PROMPT, "-t", "Paris", "--overwrite", "--plot",
                                "{w}/folder.png"], "is a folder", setup=lambda w: (w / "folder.png").mkdir(exist_ok=True),
         before_load=True),
    Case("locate-dataset-out-existing", ["locate-dataset", "-m", "{model}", "--data", "jsonl", "--data-dir",
                                         "{w}/latin1.jsonl", "--out", "{w}/existing"], "already exists",
         before_load=True),
    Case("top-text-out-existing", ["analyze", "top-text", "-m", "{model}", "--neurons", "1:5", "--out", "{w}/existing"],
         "already exists", before_load=True),
    # arguments of the wrong kind
    Case("facts-folder", ["update-fact", "-m", "{model}", "--facts", "{w}/existing"],
         "existing is a folder; give a JSON Lines file", before_load=True),
    Case("facts-with-subject", ["erase-fact", "-m", "{model}", "--facts", "{w}/latin1.jsonl", "--subject", "France"],
         "--subject does not go with --facts", before_load=True),
    Case("model-text-file", ["update-fact", "-m", "{w}/text.txt", *EDIT],
         "text.txt is a file but not a model kn-edit can load: give a .gguf file, a model folder"),
    # edits the model cannot make
    Case("zero-value-vectors", ["update-fact", "-m", "{w}/erased", *EDIT], "all zero"),
    Case("prompt-too-long", ["update-fact", "-m", "{model}", "-p", "word " * 600 + PROMPT, "--old", "Paris",
                             "--new", "Rome", "--force", "--neurons", "1:5", "--quiet"], "--max-tokens N"),
    Case("target-too-long", ["erase-fact", "-m", "{model}", "-p", PROMPT, "-t", "Paris " * 600, "--force",
                             "--neurons", "1:5", "--quiet"], "above the limit of 512"),
    Case("max-tokens-zero", ["--max-tokens", "0", "update-fact", "-m", "{model}", *EDIT], "positive integer"),
    # data
    Case("jsonl-not-utf8", ["evaluate", "--quiet", "--config", "{w}/eval.yaml"], "latin1.jsonl:2: not UTF-8"),
    # an earlier run's name: refused before anything is loaded (the data error above would come first otherwise)
    Case("evaluate-existing-run", ["evaluate", "--quiet", "--config", "{w}/eval.yaml", "run_name=taken"],
         "runs/taken already exists", setup=_earlier_run),
    Case("evaluate-existing-progress", ["evaluate", "--quiet", "--config", "{w}/eval.yaml", "run_name=stopped",
                                        "mode=sequential"], "runs/stopped.progress.json already exists", setup=_earlier_run),
    Case("compare-existing-run", ["compare", "--quiet", "--config", "{w}/eval.yaml", "run_name=taken"],
         "runs/taken already exists", setup=_earlier_run),
    # patch files
    _apply("flipped", "does not match its sha256 digest"),
    _apply("fp16", "'0.after' is torch.float16, the metadata says torch.float32"),
    _apply("bool", "'0.after'"),
    _apply("int", "not floating point"),
    _apply("nan", "'0.after' (model.layers.1.mlp.down_proj.weight) holds NaN"),
    _apply("inf", "'0.before'"),
    _apply("index-far", "rows beyond size"),
    _apply("index-negative", "negative rows"),
    _apply("index-float", "1-D int64"),
    _apply("index-repeated", "repeats rows"),
    _apply("not-json", "not valid JSON"),
    _apply("no-params", "params must be a list"),
    _apply("params-string", "params must be a list"),
    _apply("fingerprint-list", "fingerprint must be an object"),
    _apply("dim-far", "dim 7 out of range"),
    _apply("dim-float", "dim must be a non-negative integer"),
    _apply("version-99", "unsupported format version 99"),
    _apply("no-digest", "sha256 must be a sha256 hex digest"),
    _apply("missing-tensor", "'0.before'"),
    _apply("not-a-patch", "not a kn-edit patch"),
    _apply("patch", "weights differ", model="{w}/other"),
    _apply("patch", "n_layers: patch 2, model 3", model="{w}/model3"),
    Case("patch-missing", ["apply-patch", "-m", "{model}", "--patch", "{w}/nope.safetensors"], "no such patch"),
    Case("revert-unpatched", ["revert-patch", "-m", "{model}", "--patch", "{w}/patch.safetensors"],
         "does not hold the patch's patched values"),
]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_is_one_clear_line(case: Case, world: Path, tmp_path, monkeypatch, capsys):
    reason = case.skip() if case.skip else None
    if reason:
        pytest.skip(reason)
    cache = tmp_path / "cache"
    (cache / "attribution").mkdir(parents=True)
    monkeypatch.setenv("KN_EDIT_CACHE", str(cache))
    if case.setup:
        case.setup(world)
    if case.before_load:
        monkeypatch.setattr(kn_edit, "load", lambda *a, **kw: pytest.fail("the model was loaded before the refusal"))
    argv = [a.replace("{model}", str(world / "model")).replace("{w}", str(world)) for a in case.argv]
    before = file_tree(world), file_tree(cache)
    capsys.readouterr()
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert "Traceback" not in err and lines[0].startswith("error: ")
    assert case.fragment in lines[0], lines[0]
    assert (file_tree(world), file_tree(cache)) == before


def test_debug_shows_the_traceback(world):
    with pytest.raises(kn_edit.ConfigError, match="not valid YAML"):
        main(["--debug", "update-fact", "-m", str(world / "model"), *EDIT, "--config", str(world / "bad.yaml")])


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_folder_is_refused_before_the_edit(world, tmp_path, capsys):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        assert main(["update-fact", "-m", str(world / "model"), *EDIT, "--save", str(locked / "out")]) == 2
        assert "not writable" in capsys.readouterr().err
    finally:
        locked.chmod(0o755)


def test_update_on_zero_value_vectors_is_refused_with_the_model_unchanged(tiny_factory):
    km = tiny_factory("llama")
    neurons = [Neuron(1, 5), Neuron(1, 7)]
    kn_edit.erase_fact(km, [PROMPT], "Paris", neurons=neurons, force=True)
    state = snapshot(km)
    with pytest.raises(kn_edit.EditError, match="value vectors of neurons 1:5,1:7 are all zero"):
        kn_edit.update_fact(km, [PROMPT], "Paris", "Rome", neurons=neurons, force=True)
    assert_same(km, state)
    assert len(kn_edit.editing.ledger.active_edits(km)) == 1  # only the erasure


def test_every_number_setting_is_checked_finite():
    """check_finite walks every number field, also in Optional, lists, dicts and nested dataclasses, skips
    fields typed Any, and lets .inf through only where a field allows it; Python-built settings are checked too."""
    import math
    from dataclasses import field, make_dataclass
    from typing import Any, Optional

    from kn_edit.storage.config import INF_ALLOWED, check_finite
    from kn_edit.editing.finetune import FineTuneEditor
    from kn_edit.editing.knowledge_neurons import KnowledgeNeuronEditor
    from kn_edit.evaluation.config import EvalConfig

    Inner = make_dataclass("Inner", [("weights", list[float], field(default_factory=lambda: [1.0]))])
    Outer = make_dataclass("Outer", [
        ("rate", Optional[float], None), ("steps", int, 1), ("inner", Inner, field(default_factory=Inner)),
        ("by_name", dict[str, float], field(default_factory=dict)), ("free", Any, None),
        ("bound", float, field(default=1.0, metadata=INF_ALLOWED))])  # fmt: skip
    check_finite(Outer(free=math.nan, bound=math.inf))  # Any is another schema's business; .inf allowed there
    for kwargs, key in [({"rate": math.nan}, "rate"), ({"steps": math.inf}, "steps"), ({"bound": math.nan}, "bound"),
                        ({"inner": Inner([1.0, -math.inf])}, r"inner.weights\[1\]"),
                        ({"by_name": {"a": math.nan}}, "by_name.a")]:  # fmt: skip
        with pytest.raises(kn_edit.ConfigError, match=key):
            check_finite(Outer(**kwargs))
    with pytest.raises(kn_edit.ConfigError, match="margin must be a finite number"):
        KnowledgeNeuronEditor(margin=math.nan)
    with pytest.raises(kn_edit.ConfigError, match="lr must be a finite number"):
        FineTuneEditor(lr=math.inf)
    assert FineTuneEditor(norm_bound=math.inf).settings.norm_bound == math.inf
    config = EvalConfig()
    config.probe.threshold = math.nan
    with pytest.raises(kn_edit.ConfigError, match="probe.threshold must be a finite number"):
        config.check()


def test_a_10_mb_prompt_in_a_fact_file_is_refused_quickly(world, tmp_path, capsys):
    """The token limit is checked on the prompt's head (kn_edit.models.prompts.check_head): refused in well under a second
    with the usual one-line error, where tokenizing the whole prompt took 14 s and 1.5 GB."""
    import time

    facts = tmp_path / "facts.jsonl"
    facts.write_text(json.dumps({"subject": "France", "relation": "capital", "object": "Paris", "new": "Rome",
                                 "prompts": ["The capital of France is " * 400_000]}) + "\n", encoding="utf-8")
    start = time.perf_counter()
    code = main(["update-fact", "-m", str(world / "model"), "--facts", str(facts), "--neurons", "1:5", "--force",
                 "--quiet"])  # fmt: skip
    seconds = time.perf_counter() - start
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(lines) == 1, lines
    assert lines[0].startswith("error: prompt 'The capital of France is") and "above the limit of 512" in lines[0]
    assert seconds < 5
