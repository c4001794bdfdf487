"""A fact file (JSONL) for measuring paraphrases that begin with the subject (issue 30): ParaRel facts of the
relations that have both kinds of pattern, with the patterns that have the subject inside as edit prompts and
those that begin with it as held-out paraphrases, so no edit prompt gives the start key away.

    python evaluations/subject_first_facts.py PARAREL_DIR OUT.jsonl [--per-relation 40]
    kn-edit compare --config configs/compare/smollm2_subject_first.yaml data.path=OUT.jsonl
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

RELATIONS = ("P36", "P159", "P101", "P106", "P407", "P264")  # both kinds of causal pattern (subject first / inside)


def patterns(folder: Path, relation: str) -> tuple[list[str], list[str]]:
    """(patterns with the subject inside, patterns that begin with it), each ending at the answer slot."""
    rows = [json.loads(line)["pattern"].strip() for line in (folder / "patterns" / f"{relation}.jsonl").open()]
    usable = [p.rstrip(" .") for p in rows if p.rstrip(" .").endswith("[Y]") and "[X]" in p]
    return [p for p in usable if not p.startswith("[X]")], [p for p in usable if p.startswith("[X]")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("pararel", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--per-relation", type=int, default=150)
    args = parser.parse_args()
    lines = []
    for relation in RELATIONS:
        inside, first = patterns(args.pararel, relation)
        facts = [json.loads(line) for line in (args.pararel / "facts" / f"{relation}.jsonl").open()]
        for fact in facts[: args.per_relation]:
            lines.append(json.dumps({"subject": fact["sub_label"], "relation": relation, "object": fact["obj_label"],
                                     "prompts": inside[:2], "heldout_prompts": first[:3],
                                     "id": f"{relation}:{fact['uuid']}"}))
    args.out.write_text("\n".join(lines) + "\n")
    print(f"{len(lines)} facts → {args.out}")


if __name__ == "__main__":
    main()
