"""Benchmark greedy generation (kn_edit.evaluation.fluency.greedy_generations): the prompt pass with only the last
position's logits (``logits_to_keep=1``, what the code does) against every position's (the former way).

Prompts are those generation-based accuracy continues: each record's paraphrase and neighbourhood prompts of a
CounterFact-style set built from ParaRel (``kn-edit make-counterfact``'s builder, in memory), continued for
``--tokens`` tokens in batches of ``--batch-size``. The two ways alternate for ``--rounds`` rounds in one process
(a busy machine slows both alike); reported: process CPU seconds per round, their ratio, and whether both ways
gave the same tokens.

    OMP_NUM_THREADS=1 .venv/bin/python evaluations/bench_generation.py
    .venv/bin/python evaluations/bench_generation.py --model gemma3-270m --records 10
"""

from __future__ import annotations

import argparse
import inspect
import json
import statistics
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from kn_edit.data import build_counterfact, load_pararel  # noqa: E402
from kn_edit.evaluation.fluency import greedy_generations  # noqa: E402
from kn_edit.models.loading import load  # noqa: E402


@contextmanager
def every_position_logits(model: torch.nn.Module):
    """While inside, the model's forward no longer shows ``logits_to_keep`` in its signature, so generation takes
    the logits of every prompt position (the way before this change)."""
    def forward(*args, **kwargs):
        return type(model).forward(model, *args, **kwargs)

    own = inspect.signature(type(model).forward)
    forward.__signature__ = own.replace(parameters=[p for name, p in own.parameters.items()
                                                    if name not in ("self", "logits_to_keep")])  # fmt: skip
    model.forward = forward
    try:
        yield
    finally:
        del model.forward


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "pararel"), help="ParaRel folder")
    parser.add_argument("--records", type=int, default=20, help="CounterFact-style records (default 20)")
    parser.add_argument("--tokens", type=int, default=6, help="tokens generated per prompt (default 6)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    km = load(args.model, device="cpu")
    records = build_counterfact(load_pararel(args.data, seed=0), n=args.records, seed=0)
    prompts = [p for r in records for p in (*r["paraphrase_prompts"], *r["neighborhood_prompts"][:5])]

    def run() -> tuple[float, list]:
        start = time.process_time()
        made = greedy_generations(km, prompts, args.tokens, batch_size=args.batch_size)
        return time.process_time() - start, [g.token_ids for g in made]

    seconds: dict[str, list[float]] = {"every position": [], "last position": []}
    tokens: dict[str, list] = {}
    run()  # warm-up
    for _ in range(args.rounds):
        with every_position_logits(km.model):
            s, tokens["every position"] = run()
        seconds["every position"].append(s)
        s, tokens["last position"] = run()
        seconds["last position"].append(s)
    before, after = (statistics.median(seconds[k]) for k in ("every position", "last position"))
    result = {"model": args.model, "prompts": len(prompts), "tokens": args.tokens, "batch_size": args.batch_size,
              "threads": torch.get_num_threads(), "cpu_seconds": seconds, "ratio": before / after,
              "same_tokens": tokens["every position"] == tokens["last position"]}  # fmt: skip
    print(f"{args.model}: {len(prompts)} prompts x {args.tokens} tokens, {torch.get_num_threads()} thread(s)")
    print(f"  every position's logits: {before:.2f} s CPU (median of {args.rounds})")
    print(f"  last position's logits:  {after:.2f} s CPU  ->  {before / after:.2f}x, "
          f"same tokens: {result['same_tokens']}")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
