"""Patch format 2: digests checked against a plain reference, tampered files refused with the model bit for bit
unchanged, whole-parameter patches stored without an index, version-1 files still applied."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import kn_edit
from helpers import changed, new_object, redigest, same, snapshot
from kn_edit import EditError, Neuron
from kn_edit.editing import apply_patch, read_patch
from kn_edit.editing.ledger import SliceChange, commit
from kn_edit.editing.patchfile import check_model, tensor_digest
from tiny_models import build_model, prompt_for, tiny_km

NEURONS = [Neuron(0, 3), Neuron(1, 5)]


def patch_of(tmp_path, family: str = "gpt2"):
    km = tiny_km(family)
    prompt, old = prompt_for(family)
    edit = kn_edit.update_fact(km, [prompt], old, new_object(km), rule="paper", neurons=NEURONS, force=True)
    path = tmp_path / "p.safetensors"
    edit.save(path)
    return km, edit, path


def load(path):
    with safe_open(str(path), framework="pt") as f:
        return json.loads(f.metadata()["kn_edit_patch"]), {k: f.get_tensor(k) for k in f.keys()}


def write(path, meta, tensors):
    save_file(tensors, str(path), metadata={"kn_edit_patch": json.dumps(meta)})


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.int64])
def test_digest_is_the_sha256_of_the_little_endian_bytes(dtype):
    t = (torch.arange(24, dtype=torch.float32).reshape(2, 3, 4) * 0.37 - 3).to(dtype)
    if dtype == torch.bfloat16:  # numpy has no bfloat16: the same 16 bits through int16
        raw = t.view(torch.int16).numpy().astype("<i2").tobytes()
    else:
        raw = t.numpy().astype(t.numpy().dtype.newbyteorder("<")).tobytes()
    assert tensor_digest(t) == hashlib.sha256(raw).hexdigest()
    assert tensor_digest(t.t() if t.dim() == 2 else t.transpose(0, 2).contiguous().transpose(0, 2)) == tensor_digest(t)


def test_metadata_records_every_tensor(tmp_path):
    km, edit, path = patch_of(tmp_path)
    meta, tensors = load(path)
    assert meta["version"] == 2 and len(meta["params"]) == 2
    for i, p in enumerate(meta["params"]):
        assert p["whole"] is False and p["shape"] == list(km.model.get_parameter(p["name"]).shape)
        for k in ("index", "before", "after"):
            t = tensors[f"{i}.{k}"]
            assert p["tensors"][k] == {"dtype": str(t.dtype), "shape": list(t.shape),
                                       "sha256": hashlib.sha256(t.numpy().tobytes()).hexdigest()}


TAMPER = {
    "flipped-bit": lambda meta, ts: (meta, {**ts, "1.after": _flip(ts["1.after"])}),
    "fp16": lambda meta, ts: (meta, {**ts, "1.after": ts["1.after"].half()}),
    "bool-redigested": lambda meta, ts: _replaced(meta, ts, {"1.after": ts["1.after"].bool()}),
    "int-redigested": lambda meta, ts: _replaced(meta, ts, {"1.after": ts["1.after"].to(torch.int32)}),
    "nan-redigested": lambda meta, ts: _replaced(meta, ts, {"0.after": torch.full_like(ts["0.after"], float("nan"))}),
    "shape": lambda meta, ts: _replaced(meta, ts, {"0.after": ts["0.after"][..., :-1].contiguous()}),
    "index-out-of-range": lambda meta, ts: _replaced(meta, ts, {"0.index": ts["0.index"] + 10_000}),
    "dim": lambda meta, ts: ({**meta, "params": [{**meta["params"][0], "dim": 2}, meta["params"][1]]}, ts),
    "no-params": lambda meta, ts: ({k: v for k, v in meta.items() if k != "params"}, ts),
    "fingerprint-list": lambda meta, ts: ({**meta, "fingerprint": ["gpt2"]}, ts),
    "requests-string": lambda meta, ts: ({**meta, "requests": "x"}, ts),
    # a third entry changing row 3 of entry 0's parameter again, to other values; or a column of it
    "overlap": lambda meta, ts: _extra(meta, ts, 0, [2, 3]),
    "overlap-other-dim": lambda meta, ts: _extra(meta, ts, 1, [0]),
    "float64-redigested": lambda meta, ts: _replaced(meta, ts, {"0.before": ts["0.before"].double(),
                                                               "0.after": ts["0.after"].double()}),
}
# what the message must say, where the table's row is about one
SAYS = {"overlap": "entries 0 and 2 both change rows [3] of transformer.h.0.mlp.c_proj.weight",
        "overlap-other-dim": "entries 0 and 2 both change transformer.h.0.mlp.c_proj.weight (along dims 0 and 1)",
        "float64-redigested": "holds torch.float64 values for transformer.h.0.mlp.c_proj.weight, which is torch.float32"}


def _replaced(meta, tensors, new: dict):
    """The patch with the tensors of ``new`` in place of its own, its metadata following them."""
    tensors = {**tensors, **new}
    return redigest(meta, tensors), tensors


def _extra(meta, tensors, dim: int, rows: list[int]):
    """The patch with one more entry: ``rows`` along ``dim`` of entry 0's parameter, from their true values + 1."""
    name = meta["params"][0]["name"]
    index = torch.tensor(rows)
    before = tiny_km("gpt2").model.get_parameter(name).detach().index_select(dim, index).contiguous()
    tensors = {**tensors, "2.index": index, "2.before": before, "2.after": before + 1}
    entry = {**json.loads(json.dumps(meta["params"][0])), "dim": dim, "rows": len(rows)}
    return redigest({**meta, "params": [*meta["params"], entry]}, tensors), tensors


def _flip(t: torch.Tensor) -> torch.Tensor:
    flat = t.clone().contiguous().view(torch.int32).reshape(-1)
    flat[0] ^= 1  # the lowest bit of one value
    return flat.view(torch.float32).reshape(t.shape)


@pytest.mark.parametrize("how", list(TAMPER))
def test_tampered_patches_are_refused_before_anything_is_written(tmp_path, how):
    _, _, path = patch_of(tmp_path)
    meta, tensors = TAMPER[how](*load(path))
    bad = tmp_path / "bad.safetensors"
    write(bad, meta, tensors)
    fresh = tiny_km("gpt2")
    original = snapshot(fresh)
    with pytest.raises(EditError) as info:
        apply_patch(fresh, bad)
    assert "\n" not in str(info.value) and SAYS.get(how, "") in str(info.value)
    assert same(fresh, original)
    assert not kn_edit.editing.ledger.active_edits(fresh)


def test_the_untampered_patch_applies(tmp_path):
    km, _, path = patch_of(tmp_path)
    edited = snapshot(km)
    meta, tensors = load(path)
    write(tmp_path / "copy.safetensors", meta, tensors)  # rewriting alone is no tampering
    fresh = tiny_km("gpt2")
    apply_patch(fresh, tmp_path / "copy.safetensors")
    assert same(fresh, edited)


def test_disjoint_entries_of_one_parameter_apply(tmp_path):
    _, _, path = patch_of(tmp_path)
    meta, tensors = _extra(*load(path), 0, [2])  # row 2 beside entry 0's row 3: no value changed twice
    write(tmp_path / "two.safetensors", meta, tensors)
    fresh = tiny_km("gpt2")
    apply_patch(fresh, tmp_path / "two.safetensors")
    assert torch.equal(fresh.model.get_parameter(meta["params"][0]["name"])[2:4],
                       torch.cat([tensors["2.after"], tensors["0.after"]]))


def test_whole_parameter_patch(tmp_path):
    km = tiny_km("llama")
    original = snapshot(km)
    name = "model.layers.0.mlp.down_proj.weight"
    param = km.model.get_parameter(name)
    new = torch.randn(param.shape, generator=torch.Generator().manual_seed(3))
    edit = commit(km, "whole-test", [], [SliceChange(name, 1, torch.arange(param.shape[1]), new, additive=False)])
    edit.save(tmp_path / "whole.safetensors")
    meta, tensors = load(tmp_path / "whole.safetensors")
    assert meta["params"][0]["whole"] is True and meta["params"][0]["rows"] == param.shape[1]
    assert sorted(tensors) == ["0.after", "0.before"]  # no index stored
    assert torch.equal(tensors["0.before"], original[name]) and torch.equal(tensors["0.after"], new)
    edit.revert()
    assert same(km, original)

    fresh = tiny_km("llama")
    applied = apply_patch(fresh, tmp_path / "whole.safetensors")
    assert torch.equal(fresh.model.get_parameter(name), new)
    assert changed(fresh, original) == [name]
    applied.revert()
    assert same(fresh, original)
    _, entries = read_patch(tmp_path / "whole.safetensors")
    assert entries[0].whole and torch.equal(entries[0].index, torch.arange(param.shape[1]))


def test_version_1_files_still_apply(tmp_path):
    km, edit, path = patch_of(tmp_path)
    edited = snapshot(km)
    meta, tensors = load(path)
    v1 = {**meta, "version": 1, "params": [{"name": p["name"], "dim": p["dim"], "rows": p["rows"]} for p in meta["params"]]}
    write(tmp_path / "v1.safetensors", v1, tensors)
    fresh = tiny_km("gpt2")
    original = snapshot(fresh)
    applied = apply_patch(fresh, tmp_path / "v1.safetensors")
    assert same(fresh, edited)
    applied.revert()
    # still checked for what a version-1 file can be checked for
    write(tmp_path / "v1-nan.safetensors", v1, {**tensors, "0.after": torch.full_like(tensors["0.after"], float("nan"))})
    with pytest.raises(EditError, match="NaN"):
        apply_patch(fresh, tmp_path / "v1-nan.safetensors")
    assert same(fresh, original)


def test_foreign_patch_messages_say_what_differs(tmp_path):
    _, _, path = patch_of(tmp_path)
    meta, _ = read_patch(path)
    same_name = kn_edit.wrap(*build_model("gpt2", n_layers=3), name="tiny-gpt2")
    with pytest.raises(EditError, match=r"a model also named 'tiny-gpt2' but with a different layout: n_layers: patch 2, model 3"):
        check_model(same_name, meta, path)
    other_weights = tiny_km("gpt2", seed=1)
    with pytest.raises(EditError, match="weights differ from those of the 'tiny-gpt2'"):
        apply_patch(other_weights, path)


def test_patch_sizes_scale_with_rows_not_parameters(tmp_path):
    _, _, path = patch_of(tmp_path)
    km = tiny_km("gpt2")
    meta = load(path)[0]
    full = sum(km.model.get_parameter(p["name"]).numel() * 4 for p in meta["params"])
    # the tensors (the file without its JSON metadata, which carries the edit's report) are a few rows
    assert path.stat().st_size - len(json.dumps(meta)) < full / 4


def test_digest_is_stable_across_numpy_views():
    t = torch.tensor(np.arange(6, dtype="<f4").reshape(2, 3))
    assert tensor_digest(t) == hashlib.sha256(np.arange(6, dtype="<f4").tobytes()).hexdigest()
