"""Benchmark the v* optimisation shared by ROME, MEMIT and kn-subject (kn_edit.editing.keyvalue.target): one step,
or whole edits against an earlier commit.

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

``--edit METHOD``: whole edits of one fact ("The capital of France is" Paris → Rome, subject France) by the code
of this checkout and by the code of ``--base`` (a commit, unpacked with ``git archive`` into a temporary folder),
each in its own process, alternating (``--rounds``); each process makes one warm-up edit (key statistics read
from the disk cache, caches filled), then times ``--edits`` edits, each reverted before the next. Reported: the
median seconds per edit of each (wall clock and the process's CPU time, which other processes on a busy machine
disturb less), the ratios, and each one's weight change (the two must agree to float rounding).

    .venv/bin/python evaluations/bench_value_step.py --edit rome --edits 3 --rounds 2 --threads 1
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
BASE = "bedf235"  # the commit before issue 28's v* work


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


def child(args) -> dict:
    """Time edits with the code under ``args.code`` (run in a process of its own)."""
    sys.path.insert(0, args.code)
    import kn_edit
    from kn_edit.data.records import EditRequest
    from kn_edit.editing.registry import make_editor

    assert Path(kn_edit.__file__).resolve().is_relative_to(Path(args.code).resolve()), kn_edit.__file__
    km = kn_edit.load(args.model, device="cpu")
    editor = make_editor(args.edit)
    request = EditRequest(prompts=("The capital of France is",), old="Paris", new="Rome", subject="France")

    def one() -> tuple[float, float, float]:
        t, cpu = time.perf_counter(), time.process_time()
        edit = editor.apply(km, [request])
        seconds, cpu = time.perf_counter() - t, time.process_time() - cpu
        change = sum(float((p.after.double() - p.before.double()).norm()) ** 2 for p in edit.patches) ** 0.5
        edit.revert()
        return seconds, cpu, change

    warm = one()[0]
    timed = [one() for _ in range(args.edits)]
    return {"warm_up": warm, "seconds": [t for t, _, _ in timed], "cpu_seconds": [c for _, c, _ in timed],
            "change": timed[-1][2]}


def bench_edits(args) -> dict:
    runs: dict[str, list[float]] = {"base": [], "new": []}
    cpu: dict[str, list[float]] = {"base": [], "new": []}
    change: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="kn-edit-base-") as tmp:
        archive = subprocess.run(["git", "-C", str(ROOT), "archive", args.base], check=True, capture_output=True)
        subprocess.run(["tar", "-x", "-C", tmp], input=archive.stdout, check=True)
        code = {"base": tmp, "new": str(ROOT)}
        env = {**os.environ, "PYTHONPATH": ""}
        for round_ in range(args.rounds):
            for name in ("base", "new"):
                cmd = [sys.executable, __file__, "--child", "--code", code[name], "--edit", args.edit, "--edits",
                       str(args.edits), "--model", args.model, "--threads", str(args.threads)]
                out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env).stdout
                got = json.loads(out.strip().splitlines()[-1])
                runs[name] += got["seconds"]
                cpu[name] += got["cpu_seconds"]
                change[name] = got["change"]
                print(f"round {round_ + 1} {name}: warm-up {got['warm_up']:.2f} s, edits "
                      + ", ".join(f"{t:.2f}" for t in got["seconds"]) + " s (CPU "
                      + ", ".join(f"{t:.2f}" for t in got["cpu_seconds"]) + " s)", file=sys.stderr)
    median = {k: statistics.median(v) for k, v in runs.items()}
    median_cpu = {k: statistics.median(v) for k, v in cpu.items()}
    return {"model": args.model, "method": args.edit, "base": args.base, "threads": args.threads,
            "edits_per_round": args.edits, "rounds": args.rounds, "seconds": runs, "cpu_seconds": cpu,
            "median_seconds": median, "median_cpu_seconds": median_cpu, "speedup": median["base"] / median["new"],
            "speedup_cpu": median_cpu["base"] / median_cpu["new"], "weight_change": change,
            "weight_change_relative_difference": abs(change["base"] - change["new"]) / max(change["base"], 1e-30)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--edit", choices=["rome", "memit", "kn-subject"], help="time whole edits of this method")
    parser.add_argument("--edits", type=int, default=3, help="timed edits per process")
    parser.add_argument("--rounds", type=int, default=2, help="processes per code version, alternating")
    parser.add_argument("--base", default=BASE, help="the commit whose code is compared")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--code", help=argparse.SUPPRESS)
    parser.add_argument("--json", help="also write the numbers to this file")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.child:
        print(json.dumps(child(args)))
        return
    if args.edit is None:
        sys.path.insert(0, str(ROOT))
        result = bench_steps(args)
    else:
        result = bench_edits(args)
    print(json.dumps(result, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
