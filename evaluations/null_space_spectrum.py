"""How much of a layer's generic keys and of subjects' keys lies in AlphaEdit's null space, per threshold.

The null-space option (kn_edit/editing/nullspace.py) projects an update onto the eigenvectors of C = E[k kᵀ]
(Wikipedia keys) whose eigenvalue is below ``threshold`` × the largest. It preserves generic text only as far as
that space holds little of C's energy (trace share), and it can edit a subject only through the share of the
subject's key that lies there. This prints both per critical layer and threshold, and the mean cosine of two
subjects' keys of the same relation before and after projection (how far the null space tells them apart).

    .venv/bin/python evaluations/null_space_spectrum.py --facts evaluations/results/sequential100_smollm2/facts-memit-nullspace.jsonl \\
        --out evaluations/results/null_space_spectrum.json
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import kn_edit  # noqa: E402
from kn_edit.editing.memit import default_layers  # noqa: E402
from kn_edit.editing.keyvalue.statistics import key_statistics  # noqa: E402
from kn_edit.editing.keyvalue.keys import context_prefixes, keys_at, subject_texts  # noqa: E402


def subjects_by_relation(path: Path) -> dict[str, list[str]]:
    """{relation: distinct subjects} of a sequential run's per-edit rows."""
    found: dict[str, list[str]] = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        row = json.loads(line)
        subjects = found.setdefault(row["relation"], [])
        if row["subject"] not in subjects:
            subjects.append(row["subject"])
    return found


def mean_pair_cosine(keys: torch.Tensor, groups: list[list[int]]) -> float:
    """Mean cosine over every pair of keys within a group (same relation)."""
    cos = [float(torch.nn.functional.cosine_similarity(keys[i], keys[j], dim=0))
           for g in groups for i, j in itertools.combinations(g, 2)]
    return sum(cos) / len(cos)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--facts", type=Path, required=True, help="a sequential run's facts-METHOD.jsonl (subjects)")
    parser.add_argument("--thresholds", default="0.02,0.01,0.0075,0.005")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    km = kn_edit.load(args.model, device="cpu")
    by_relation = subjects_by_relation(args.facts)
    subjects = [s for group in by_relation.values() for s in group]
    groups, start = [], 0
    for group in by_relation.values():
        groups.append(list(range(start, start + len(group))))
        start += len(group)
    prefixes = context_prefixes(km, 5, 10)  # MEMIT's defaults: the prefix-averaged key each edit solves for
    result = {"model": args.model, "subjects": len(subjects), "layers": {}}
    for layer in default_layers(km):
        c = key_statistics(km, layer).mom2.double()
        values, vectors = torch.linalg.eigh((c + c.T) / 2)
        top, trace = float(values[-1]), float(values.sum())
        keys = torch.stack([keys_at(km, layer, subject_texts(km, s, [s], prefixes, True)).mean(dim=0)
                            for s in subjects]).double()
        rows = []
        for threshold in (float(t) for t in args.thresholds.split(",")):
            keep = values <= threshold * top
            basis = vectors[:, keep]
            projected = keys @ basis
            subject_share = (projected.norm(dim=1) ** 2 / keys.norm(dim=1) ** 2).mean()
            rows.append({
                "threshold": threshold, "dims": int(keep.sum()), "of": len(values),
                "generic_energy": float(values[keep].sum()) / trace,
                "subject_energy": float(subject_share),
                "same_relation_cosine": mean_pair_cosine(projected, groups) if int(keep.sum()) else None,
            })
        result["layers"][layer] = {"top_eigenvalue_share": top / trace,
                                   "same_relation_cosine_full": mean_pair_cosine(keys, groups), "thresholds": rows}
        print(f"layer {layer}: largest eigenvalue {100 * top / trace:.1f} % of the trace; same-relation key cosine "
              f"{result['layers'][layer]['same_relation_cosine_full']:.3f}")
        for r in rows:
            cos = "n/a" if r["same_relation_cosine"] is None else f"{r['same_relation_cosine']:.3f}"
            print(f"  threshold {r['threshold']:g}: {r['dims']}/{r['of']} dims, generic energy "
                  f"{100 * r['generic_energy']:.1f} %, subject keys' energy {100 * r['subject_energy']:.1f} %, "
                  f"same-relation cosine {cos}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
