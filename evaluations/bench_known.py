"""Benchmark the known-fact check that picks the facts an evaluation edits (kn_edit.data.requests.known_mask).

Side by side in one run, over the same ParaRel facts (the first ``--facts`` of ``--relations`` in a seeded order,
``--prompts`` edit prompts each), chunk by chunk so that a busy machine slows both alike:

* plain: every prompt of every fact through the model, logits of every position, the answer position's argmax
  compared with the object's tokens (the check as it was before: written here plainly);
* known_mask: prompts in rounds, a fact left out once decided (with ``min_share`` 1.0, at its first wrong prompt),
  and only the answer positions through the output head.

Reported: facts per second of each, the ratio, and whether both gave the same flags (they must). The cache of
flags on disk (kn_edit.evaluation.known_cache) is not involved; it removes the check from every later run.

    .venv/bin/python evaluations/bench_known.py --facts 400 --threads 1
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import kn_edit  # noqa: E402
from kn_edit.data import load_pararel  # noqa: E402
from kn_edit.data.requests import known_mask  # noqa: E402


@torch.no_grad()
def plain_known(km, records, min_share: float, batch_size: int) -> list[bool]:
    """Every prompt, every position's logits; a prompt is right when every teacher-forced token is the argmax."""
    steps, owner = [], []
    for i, record in enumerate(records):
        for j, prompt in enumerate(record.prompts):
            for step in km.encode(prompt, record.object).steps:
                steps.append(step)
                owner.append((i, j))
    right = {(i, j): True for i, r in enumerate(records) for j in range(len(r.prompts))}
    for start in range(0, len(steps), batch_size):
        chunk = steps[start : start + batch_size]
        ids, mask = km.pad([s.input_ids for s in chunk])
        logits = km.model(input_ids=ids, attention_mask=mask).logits
        for k, step in enumerate(chunk):
            if int(logits[k, step.position].argmax()) != step.target_id:
                right[owner[start + k]] = False
    out = []
    for i, record in enumerate(records):
        n = len(record.prompts)
        out.append(n > 0 and sum(right[(i, j)] for j in range(n)) >= min_share * n)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "pararel"))
    parser.add_argument("--relations", default="P103,P1412,P176,P178,P36,P17,P30,P495,P27,P140")
    parser.add_argument("--facts", type=int, default=400)
    parser.add_argument("--prompts", type=int, default=3)
    parser.add_argument("--min-share", type=float, default=1.0)
    parser.add_argument("--chunk", type=int, default=64, help="facts per chunk (the two variants alternate per chunk)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", help="also write the numbers to this file")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    km = kn_edit.load(args.model, device="cpu")
    facts = load_pararel(args.data, relations=args.relations.split(","), max_prompts=args.prompts, download=False)
    records = list(facts.records)
    random.Random(0).shuffle(records)
    records = records[: args.facts]
    seconds = {"plain": 0.0, "known_mask": 0.0}
    same, known = True, 0
    for start in range(0, len(records), args.chunk):
        chunk = records[start : start + args.chunk]
        t = time.perf_counter()
        a = plain_known(km, chunk, args.min_share, args.batch_size)
        seconds["plain"] += time.perf_counter() - t
        t = time.perf_counter()
        b = known_mask(km, chunk, args.min_share, args.batch_size)
        seconds["known_mask"] += time.perf_counter() - t
        same &= a == b
        known += sum(b)
    n = len(records)
    result = {"facts": n, "known": known, "prompts_per_fact": args.prompts, "min_share": args.min_share,
              "threads": args.threads, "seconds": seconds,
              "facts_per_second": {k: n / v for k, v in seconds.items()},
              "speedup": seconds["plain"] / seconds["known_mask"], "same_flags": same}  # fmt: skip
    print(json.dumps(result, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
    if not same:
        sys.exit("the two checks disagree")


if __name__ == "__main__":
    main()
