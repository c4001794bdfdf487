"""How much of a layer's generic keys and of subjects' keys lies in AlphaEdit's null space, per threshold.

The null-space option (kn_edit/editing/nullspace.py) projects an update onto the eigenvectors of C = E[k kᵀ]
(Wikipedia keys) whose eigenvalue is at most ``threshold`` × the largest. It preserves generic text only as far
as that space holds little of C's energy (its trace share), and it can edit a subject only through the share of
the subject's key that lies there. Per critical layer (MEMIT's) and threshold this measures both, and the mean
cosine of two subjects' keys of the same relation before and after projection (how far the null space tells
them apart). The subjects' keys are MEMIT's k*: the key at the subject's last token, averaged over its context
prefixes; C is the cached key statistics MEMIT's edits use.
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import torch

from ..editing.keyvalue.keys import context_prefixes, keys_at, subject_texts
from ..editing.keyvalue.statistics import statistics_for
from ..editing.memit import MemitSettings, default_layers
from ..errors import ConfigError, DataError
from ..progress import NullReporter, Reporter

if TYPE_CHECKING:
    from ..models.model import KnModel

THRESHOLDS = (0.02, 0.01, 0.0075, 0.005)


def subjects_by_relation(path: str | Path) -> dict[str, list[str]]:
    """{relation: distinct subjects, in order} of per-fact rows (a comparison's ``facts-METHOD.jsonl``, or any
    JSONL file whose lines carry ``relation`` and ``subject``)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"facts file not found: {path}")
    found: dict[str, list[str]] = {}
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            relation, subject = row["relation"], row["subject"]
        except (ValueError, KeyError, TypeError):
            raise DataError(f"{path}, line {number}: not a JSON object with 'relation' and 'subject'") from None
        subjects = found.setdefault(str(relation), [])
        if subject not in subjects:
            subjects.append(subject)
    if not found:
        raise DataError(f"{path} holds no facts")
    return found


def mean_pair_cosine(keys: torch.Tensor, groups: Sequence[Sequence[int]]) -> float | None:
    """Mean cosine over every pair of keys (rows of ``keys``) within a group; None where no group has two."""
    cos = [float(torch.nn.functional.cosine_similarity(keys[i], keys[j], dim=0))
           for g in groups for i, j in itertools.combinations(g, 2)]  # fmt: skip
    return sum(cos) / len(cos) if cos else None


def spectrum(mom2: torch.Tensor, keys: torch.Tensor, groups: Sequence[Sequence[int]],
             thresholds: Sequence[float]) -> dict:
    """One layer's numbers from its key statistics C = ``mom2`` [d, d] and the subjects' keys [n, d] (``groups``:
    the rows of each relation): the largest eigenvalue's share of the trace, the same-relation cosine of the keys,
    and per threshold the null space's dimensions, its share of C's trace (generic energy), the mean share of a
    subject key's squared norm in it and the same-relation cosine of the projected keys (in the basis Ûᵀ k)."""
    c = mom2.double()
    values, vectors = torch.linalg.eigh((c + c.T) / 2)  # ascending
    keys = keys.double()
    top, trace = float(values[-1]), float(values.sum())
    rows = []
    for threshold in thresholds:
        keep = values <= threshold * top  # the cut of kn_edit.editing.nullspace.null_space
        projected = keys @ vectors[:, keep]
        rows.append({
            "threshold": threshold, "dims": int(keep.sum()), "of": len(values),
            "generic_energy": float(values[keep].sum()) / trace,
            "subject_energy": float((projected.norm(dim=1) ** 2 / keys.norm(dim=1) ** 2).mean()),
            "same_relation_cosine": mean_pair_cosine(projected, groups) if int(keep.sum()) else None,
        })  # fmt: skip
    return {"top_eigenvalue_share": top / trace, "same_relation_cosine_full": mean_pair_cosine(keys, groups),
            "thresholds": rows}  # fmt: skip


def null_space_spectrum(km: KnModel, by_relation: dict[str, list[str]], thresholds: Sequence[float] = THRESHOLDS,
                        settings: MemitSettings | None = None, key_texts: Sequence[str] | None = None,
                        reporter: Reporter | None = None) -> dict:
    """``spectrum`` of each of MEMIT's layers (``settings.layers``, default the model's critical layers) for the
    subjects ``by_relation``, with the key statistics and context prefixes of MEMIT's ``settings`` (default: its
    defaults; ``key_texts``: the text the statistics are taken over instead of the corpus):
    {"subjects", "layers": {layer: ...}}."""
    if not thresholds or any(not 0.0 < t <= 1.0 for t in thresholds):
        raise ConfigError(f"thresholds must be in (0, 1], got {list(thresholds)}")
    settings = settings or MemitSettings()
    layers = list(settings.layers) if settings.layers else default_layers(km)
    bad = [layer for layer in layers if not 0 <= layer < km.n_layers]
    if bad:
        raise ConfigError(f"layers {bad} out of range: {km.name} has layers 0..{km.n_layers - 1}")
    subjects = [s for group in by_relation.values() for s in group]
    groups, start = [], 0
    for group in by_relation.values():
        groups.append(list(range(start, start + len(group))))
        start += len(group)
    prefixes = context_prefixes(km, settings.n_prefixes, settings.prefix_length, settings.prefix_top_k,
                                settings.prefix_seed)  # the prefix-averaged key each edit solves for
    reporter = reporter or NullReporter()
    result: dict = {"subjects": len(subjects), "layers": {}}
    with reporter.task("null space per layer", total=len(layers)) as task:
        for layer in layers:
            mom2 = statistics_for(km, layer, settings, key_texts, reporter).mom2
            keys = torch.stack([keys_at(km, layer, subject_texts(km, s, [s], prefixes, True)).mean(dim=0)
                                for s in subjects])  # fmt: skip
            result["layers"][layer] = spectrum(mom2, keys, groups, thresholds)
            task.advance()
    return result


def markdown_lines(result: dict) -> list[str]:
    """One line per layer and threshold, as percentages."""
    lines = []
    for layer, v in result["layers"].items():
        full = v["same_relation_cosine_full"]
        lines.append(f"layer {layer}: largest eigenvalue {100 * v['top_eigenvalue_share']:.1f} % of the trace; "
                     f"same-relation key cosine {'n/a' if full is None else f'{full:.3f}'}")  # fmt: skip
        for r in v["thresholds"]:
            cos = "n/a" if r["same_relation_cosine"] is None else f"{r['same_relation_cosine']:.3f}"
            lines.append(f"  threshold {r['threshold']:g}: {r['dims']}/{r['of']} dims, generic energy "
                         f"{100 * r['generic_energy']:.1f} %, subject keys' energy {100 * r['subject_energy']:.1f} %, "
                         f"same-relation cosine {cos}")  # fmt: skip
    return lines
