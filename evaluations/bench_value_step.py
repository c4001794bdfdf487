"""Benchmark the v* optimisation shared by ROME, MEMIT and kn-subject (kn_edit.editing.keyvalue.target): one step.

A step is the forward of every rewrite row from the subject's last token on (the prefix before it is cached) with δ
added there, and the backward to δ; only the positions the objective reads (answer tokens, KL position) reach the
output head. Side by side in one run, alternating step by step on the same rows and δ:

* grouped: one forward per group of rows of one shape (subject position, length), every block;
* padded: every row in one forward, prefixes right-aligned in a zero-padded, masked cache, suffixes padded on the
  right, every block (the default before issue 28);
* upper: padded, and the blocks below the edited layer skipped after the first step (their output does not depend
  on δ; the default).

Reported: seconds per step of each, the ratios, and the largest difference of each gradient from the grouped one
relative to its norm (they must agree to float rounding).

    .venv/bin/python evaluations/bench_value_step.py --steps 10 --threads 1

Whole edits of these methods against an earlier commit (formerly ``--edit METHOD``) are timed by
``evaluations/bench_edit.py --methods rome,memit,kn-subject --against REV``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def bench_steps(args) -> dict:
    import kn_edit
    from kn_edit.editing.keyvalue.keys import context_prefixes
    from kn_edit.editing.keyvalue.target import _Steps, kl_row, rewrite_rows
    from kn_edit.editing.rome.settings import RomeSettings

    km = kn_edit.load(args.model, device="cpu")
    s = RomeSettings()
    layer = s.layer_for(km)
    prompts = ["The official language of France is", "France's official language is", "In France, people speak"]
    prefixes = context_prefixes(km, s.n_prefixes, s.prefix_length, s.prefix_top_k, s.prefix_seed)
    rows = rewrite_rows(km, prompts, "France", "German", prefixes) + [kl_row(km, "France")]
    wanted = [(i, p) for i, r in enumerate(rows) for p in r.answer]
    plans = {"grouped": _Steps(km, rows, wanted, padded=False, upper=False),
             "padded": _Steps(km, rows, wanted, packed=False, upper=False),
             "packed": _Steps(km, rows, wanted, upper=False),
             "upper": _Steps(km, rows, wanted)}  # fmt: skip
    assert plans["padded"].plan is not None, "this model's cache cannot be padded"
    assert plans["packed"].plan.mask.dim() == 4, "this model's rows cannot be packed"
    module = km.value_proj(layer)
    delta = (0.1 * torch.randn(km.d_model, generator=torch.Generator().manual_seed(0))).requires_grad_(True)

    def step(name: str) -> torch.Tensor:
        loss = torch.log_softmax(plans[name].logits(module, delta).float(), -1).max(-1).values.sum()
        return torch.autograd.grad(loss, [delta])[0]

    seconds = {name: 0.0 for name in plans}
    worst = {name: 0.0 for name in plans if name != "grouped"}
    for name in plans:
        step(name)  # warm-up (the upper plan's first step also runs every block once, without gradient)
    assert plans["upper"].skipping, "the upper plan fell back to every block"
    for _ in range(args.steps):
        grads = {}
        for name in plans:
            t = time.perf_counter()
            grads[name] = step(name)
            seconds[name] += time.perf_counter() - t
        ref = grads["grouped"]
        for name in worst:
            worst[name] = max(worst[name], float((ref - grads[name]).abs().max() / ref.norm().clamp(min=1e-30)))
    groups = plans["grouped"].groups
    per_step = {k: v / args.steps for k, v in seconds.items()}
    return {"model": args.model, "layer": layer, "n_layers": km.n_layers, "rows": len(rows), "groups": len(groups),
            "suffix_positions": sum(int(g.ids.shape[0] * (g.ids.shape[1] - g.start)) for g in groups),
            "padded_positions": int(plans["padded"].plan.ids.numel()),
            "packed_positions": int(plans["packed"].plan.ids.numel()), "head_positions": len(wanted),
            "steps": args.steps, "threads": args.threads, "seconds_per_step": per_step,
            "speedup": per_step["grouped"] / per_step["padded"],
            "speedup_packed_vs_padded": per_step["padded"] / per_step["packed"],
            "speedup_upper_vs_padded": per_step["padded"] / per_step["upper"],
            "max_gradient_difference": worst}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", help="also write the numbers to this file")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    sys.path.insert(0, str(ROOT))
    result = bench_steps(args)
    print(json.dumps(result, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
