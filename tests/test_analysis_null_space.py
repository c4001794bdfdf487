"""`kn-edit analyze null-space` (kn_edit/analysis/null_space.py): the share of generic text's key energy and of the
subjects' keys in AlphaEdit's null space, and the same-relation cosine of the keys, against the same numbers
written plainly (numpy eigendecomposition, an explicit projector, keys read with a hook one text at a time)."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest
import torch

from kn_edit.analysis.null_space import null_space_spectrum, spectrum, subjects_by_relation
from kn_edit.cli import main
from kn_edit.editing.keyvalue.keys import context_prefixes, with_prefix
from kn_edit.editing.keyvalue.statistics import key_statistics
from kn_edit.editing.memit import MemitSettings
from plain_values import plain_key, plain_keys
from tiny_models import CORPUS

SUBJECTS = {"capital": ["France", "Italy", "Japan"], "language": ["Dante", "Paris"]}
THRESHOLDS = [1.0, 0.1, 0.01]


def _plain(c: np.ndarray, keys: np.ndarray, groups: list[list[int]], threshold: float) -> dict:
    """One threshold's numbers from C [d, d] and keys [n, d], with the projector P = U Uᵀ written out."""
    values, vectors = np.linalg.eigh((c + c.T) / 2)
    keep = values <= threshold * values.max()
    u = vectors[:, keep]
    projected = keys @ (u @ u.T)  # P k for each key (P is symmetric)
    pairs = [(i, j) for g in groups for i, j in itertools.combinations(g, 2)]
    cos = [projected[i] @ projected[j] / np.linalg.norm(projected[i]) / np.linalg.norm(projected[j])
           for i, j in pairs if keep.any()]  # fmt: skip
    return {"dims": int(keep.sum()), "generic_energy": values[keep].sum() / np.trace(c),
            "subject_energy": np.mean([projected[i] @ projected[i] / (keys[i] @ keys[i]) for i in range(len(keys))]),
            "same_relation_cosine": np.mean(cos) if keep.any() else None}  # fmt: skip


def test_spectrum_is_the_plain_projection():
    rng = np.random.default_rng(0)
    basis = rng.standard_normal((12, 12))
    c = basis @ np.diag(np.geomspace(1.0, 1e-4, 12)) @ basis.T
    keys = rng.standard_normal((5, 12))
    groups = [[0, 1, 2], [3, 4]]
    found = spectrum(torch.from_numpy(c), torch.from_numpy(keys), groups, [1.0, 0.05, 1e-3, 1e-9])
    assert found["top_eigenvalue_share"] == pytest.approx(np.linalg.eigvalsh(c).max() / np.trace(c), rel=1e-10)
    for row, threshold in zip(found["thresholds"], [1.0, 0.05, 1e-3, 1e-9]):
        plain = _plain(c, keys, groups, threshold)
        assert row["dims"] == plain["dims"] and row["of"] == 12
        assert row["generic_energy"] == pytest.approx(plain["generic_energy"], rel=1e-9, abs=1e-12)
        assert row["subject_energy"] == pytest.approx(plain["subject_energy"], rel=1e-9, abs=1e-12)
        if plain["same_relation_cosine"] is None:
            assert row["same_relation_cosine"] is None and row["dims"] == 0
        else:
            assert row["same_relation_cosine"] == pytest.approx(plain["same_relation_cosine"], rel=1e-9)
    everything = found["thresholds"][0]  # threshold 1: the whole space, nothing projected away
    assert everything["dims"] == 12 and everything["generic_energy"] == pytest.approx(1.0)
    assert everything["same_relation_cosine"] == pytest.approx(found["same_relation_cosine_full"])


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_null_space_spectrum_of_a_tiny_model_is_the_plain_computation(tiny_factory, tmp_path, family):
    km = tiny_factory(family)
    settings = MemitSettings(layers=[0, 1], n_prefixes=2, prefix_length=3, cache_dir=str(tmp_path))
    found = null_space_spectrum(km, SUBJECTS, THRESHOLDS, settings, key_texts=CORPUS)
    assert found["subjects"] == 5 and list(found["layers"]) == [0, 1]
    prefixes = context_prefixes(km, 2, 3)
    groups = [[0, 1, 2], [3, 4]]
    for layer in (0, 1):
        c = key_statistics(km, layer, CORPUS, cache_dir=tmp_path).mom2.double().numpy()
        every = plain_keys(km, layer, CORPUS)  # the statistics are E[k kᵀ] over the text's tokens
        assert c == pytest.approx(every.T @ every / len(every), rel=1e-4, abs=1e-6)
        keys = []
        for subject in (s for group in SUBJECTS.values() for s in group):
            texts = [with_prefix(p, subject) for p in prefixes]
            ids = [km.tokenizer(t, add_special_tokens=True)["input_ids"] for t in texts]
            keys.append(np.mean([plain_key(km, layer, torch.tensor(i), len(i) - 1) for i in ids], axis=0))
        keys = np.stack(keys)
        result = found["layers"][layer]
        assert result["top_eigenvalue_share"] == pytest.approx(np.linalg.eigvalsh(c).max() / np.trace(c), rel=1e-6)
        full = np.mean([keys[i] @ keys[j] / np.linalg.norm(keys[i]) / np.linalg.norm(keys[j])
                        for g in groups for i, j in itertools.combinations(g, 2)])  # fmt: skip
        assert result["same_relation_cosine_full"] == pytest.approx(full, rel=1e-4)
        for row, threshold in zip(result["thresholds"], THRESHOLDS):
            plain = _plain(c, keys, groups, threshold)
            assert row["threshold"] == threshold and row["dims"] == plain["dims"] and row["of"] == km.d_ff
            assert row["generic_energy"] == pytest.approx(plain["generic_energy"], rel=1e-6, abs=1e-9)
            assert row["subject_energy"] == pytest.approx(plain["subject_energy"], rel=1e-4, abs=1e-6)
            if plain["same_relation_cosine"] is not None:
                assert row["same_relation_cosine"] == pytest.approx(plain["same_relation_cosine"], rel=1e-4, abs=1e-6)


def test_analyze_null_space_writes_the_json_and_refuses_bad_input(tiny_load, tmp_path, capsys):
    facts = tmp_path / "facts-memit.jsonl"
    facts.write_text("".join(json.dumps({"relation": r, "subject": s, "new": "x"}) + "\n"
                             for r, group in SUBJECTS.items() for s in group + group[:1]))  # repeats count once
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(CORPUS))
    settings = ["layers=[1]", "n_prefixes=1", "prefix_length=2", f"cov_corpus={corpus}", f"cache_dir={tmp_path / 'c'}"]
    out = tmp_path / "spectrum.json"
    argv = ["analyze", "null-space", "--facts", str(facts), "--thresholds", "1,0.01", "--out", str(out), "--quiet"]
    assert main(argv + settings) == 0
    written = json.loads(out.read_text())
    assert written["subjects"] == 5 and list(written["layers"]) == ["1"]
    assert [r["threshold"] for r in written["layers"]["1"]["thresholds"]] == [1.0, 0.01]
    assert "layer 1: largest eigenvalue" in capsys.readouterr().out
    assert out.read_text() == json.dumps(written, indent=2) + "\n"
    assert main(argv + settings) == 2  # an existing file, refused before any work
    assert "already exists" in capsys.readouterr().err
    assert main(argv + settings + ["--overwrite"]) == 0
    assert main(argv[:-3] + ["--out", str(tmp_path / "o.json"), "layers=[99]"]) == 2
    assert "out of range" in capsys.readouterr().err and not (tmp_path / "o.json").exists()
    (tmp_path / "bad.jsonl").write_text('{"subject": "France"}\n')
    assert main(["analyze", "null-space", "--facts", str(tmp_path / "bad.jsonl")]) == 2
    assert "line 1" in capsys.readouterr().err
    assert main(["analyze", "null-space", "--facts", str(facts), "--thresholds", "0.01,x"]) == 2
    assert "comma-separated numbers" in capsys.readouterr().err


def test_subjects_by_relation_keeps_first_appearance_order(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text("\n".join(json.dumps({"relation": r, "subject": s}) for r, s in
                              [("P1", "a"), ("P2", "b"), ("P1", "c"), ("P1", "a")]) + "\n\n")  # fmt: skip
    assert subjects_by_relation(path) == {"P1": ["a", "c"], "P2": ["b"]}
