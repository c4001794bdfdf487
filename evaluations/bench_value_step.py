"""Benchmark one step of the v* optimisation shared by ROME, MEMIT and kn-subject (kn_edit.editing.rome.values).

A step is the forward of every rewrite row from the subject's last token on (the prefix before it is cached) with δ
added there, and the backward to δ. Side by side in one run, alternating step by step on the same rows and δ:

* full head: every suffix position through the output head, the objective's positions picked afterwards (as
  before);
* answer positions: only the positions the objective reads (the answer tokens and the KL position) reach the head.

Reported: seconds per step of each, the ratio, and the largest difference of the two gradients relative to the
gradient's norm (they must agree to float rounding).

    .venv/bin/python evaluations/bench_value_step.py --steps 10 --threads 1
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import kn_edit  # noqa: E402
from kn_edit.editing.rome.keys import context_prefixes  # noqa: E402
from kn_edit.editing.rome.settings import RomeSettings  # noqa: E402
from kn_edit.editing.rome.values import _groups, _suffix_logits, kl_row, rewrite_rows  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", help="also write the numbers to this file")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    km = kn_edit.load(args.model, device="cpu")
    s = RomeSettings()
    layer = s.layer_for(km)
    prompts = ["The official language of France is", "France's official language is", "In France, people speak"]
    prefixes = context_prefixes(km, s.n_prefixes, s.prefix_length, s.prefix_top_k, s.prefix_seed)
    rows = rewrite_rows(km, prompts, "France", "German", prefixes) + [kl_row(km, "France")]
    groups = _groups(km, rows)
    place = {i: (g, j) for g, group in enumerate(groups) for j, i in enumerate(group.members)}
    wanted = [(place[i], p - r.subject) for i, r in enumerate(rows) for p in r.answer]
    needed: list[dict] = [{} for _ in groups]
    for (g, j), pos in wanted:
        needed[g].setdefault((j, pos), len(needed[g]))
    select = [(torch.tensor([j for j, _ in n]), torch.tensor([p for _, p in n])) for n in needed]
    module = km.value_proj(layer)
    delta = (0.1 * torch.randn(km.d_model, generator=torch.Generator().manual_seed(0))).requires_grad_(True)

    def step(selected: bool) -> torch.Tensor:
        logits = [_suffix_logits(km, module, group, delta, select[g] if selected else None) for g, group in enumerate(groups)]
        picked = [logits[g][needed[g][(j, p)]] if selected else logits[g][j, p] for (g, j), p in wanted]
        loss = torch.stack([torch.log_softmax(x.float(), -1).max() for x in picked]).sum()
        return torch.autograd.grad(loss, [delta])[0]

    seconds = {"full_head": 0.0, "answer_positions": 0.0}
    worst = 0.0
    step(True), step(False)  # warm-up
    for _ in range(args.steps):
        t = time.perf_counter()
        full = step(False)
        seconds["full_head"] += time.perf_counter() - t
        t = time.perf_counter()
        part = step(True)
        seconds["answer_positions"] += time.perf_counter() - t
        worst = max(worst, float((full - part).abs().max() / full.norm().clamp(min=1e-30)))
    result = {"model": args.model, "layer": layer, "rows": len(rows), "groups": len(groups),
              "suffix_positions": sum(int(g.ids.shape[0] * (g.ids.shape[1] - g.start)) for g in groups),
              "head_positions": sum(len(n) for n in needed), "steps": args.steps, "threads": args.threads,
              "seconds_per_step": {k: v / args.steps for k, v in seconds.items()},
              "speedup": seconds["full_head"] / seconds["answer_positions"], "max_gradient_difference": worst}  # fmt: skip
    print(json.dumps(result, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
