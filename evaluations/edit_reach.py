"""Where one edit reaches other prompts (kn_edit.analysis.reach): per prompt, its top-1 answer before and after the
edit and the tokens at which the edited layer's output moved most, as shares of the edit's own shift ‖δ‖.

    OMP_NUM_THREADS=1 .venv/bin/python evaluations/edit_reach.py --model gemma3-270m --method kn-subject \\
        --prompt "MacBook Air is developed by" --subject "MacBook Air" --old Apple --new Nissan \\
        --neighbour "iPhone is developed by" --neighbour "iPad 4 is developed by" [key=value settings ...]

``--known1000 RELATION:OBJECT`` adds the Known 1000 prompts of that relation and object (../shared/data) as
neighbours, e.g. ``--known1000 P103:French`` for the other French speakers of "Delphine de Girardin".
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def known1000_prompts(path: Path, spec: str, subject: str, limit: int) -> list[str]:
    relation, _, obj = spec.partition(":")
    records = json.loads((path / "known_1000.json").read_text())
    return [r["prompt"] for r in records if r["relation_id"] == relation and r["attribute"] == obj
            and r["subject"] != subject][:limit]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--method", default="kn-subject")
    parser.add_argument("--prompt", action="append", required=True)
    parser.add_argument("--subject", required=True)
    parser.add_argument("--old", required=True)
    parser.add_argument("--new", required=True)
    parser.add_argument("--neighbour", action="append", default=[])
    parser.add_argument("--known1000", help="RELATION:OBJECT: that relation's Known 1000 prompts with that object")
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "known_1000")
    parser.add_argument("--limit", type=int, default=10, help="Known 1000 prompts taken at most")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("settings", nargs="*", help="the method's key=value settings")
    args = parser.parse_args()

    import torch
    from rich.console import Console
    from rich.table import Table

    import kn_edit
    from kn_edit.analysis.reach import edit_reach
    from kn_edit.editing import EditRequest, make_editor

    torch.set_num_threads(args.threads)
    prompts = list(args.neighbour)
    if args.known1000:
        prompts += known1000_prompts(args.data, args.known1000, args.subject, args.limit)
    if not prompts:
        sys.exit("no neighbour prompts: give --neighbour or --known1000")
    km = kn_edit.load(args.model, device="cpu")
    editor = make_editor(args.method, overrides=args.settings)
    request = EditRequest(tuple(args.prompt), args.old, args.new, subject=args.subject)
    edit, reach = edit_reach(km, editor, request, prompts)
    edit.revert()
    table = Table(title=f"{args.method} on {args.model}: {args.subject!r} {args.old} → {args.new}; output moved, ÷ ‖δ‖")
    for column in ("prompt", "before → after", "moved most (token@position: share)", "last token"):
        table.add_column(column)
    for r in reach:
        moved = " ".join(f"{t.strip()!r}@{i}: {s:.2f}" for i, t, s in r.strongest())
        table.add_row(r.prompt, f"{r.before.strip()!r} → {r.after.strip()!r}" + (" (flipped)" if r.flipped else ""),
                      moved, f"{r.shares[-1]:.2f}")
    Console().print(table)


if __name__ == "__main__":
    main()
