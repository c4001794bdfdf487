"""Benchmark the top-text scan (kn_edit.analysis.top_text) on smollm2-135m over Wikipedia extracts.

Side by side in one run, over the same text (the first ``--extracts`` extracts by title, each cut at
``--max-tokens`` tokens, ``--batch-size`` per forward pass), chunk by chunk so that a busy machine slows every
variant alike:

* scan, early stop: the batched streaming scan, forward stopped after the highest neuron layer;
* plain full forward: the model's forward pass over the same batches (no hooks, no scan);
* scan, full forward: the same scan with the early stop off;
* scan, one at a time: the early-stopped scan with one extract per forward pass.

Reported: tokens per second of each, the ratios, the layer the early stop implies ((layer + 1) / n_layers of the
blocks run), and whether the early-stopped and full scans found the same texts.

    .venv/bin/python evaluations/bench_top_text.py --extracts 1000
    .venv/bin/python evaluations/bench_top_text.py --extracts 100 --neurons 14:100,10:7   # a loaded CPU
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
from kn_edit.analysis.corpus import wiki_extracts  # noqa: E402
from kn_edit.analysis.top_text import _encode, top_texts  # noqa: E402
from kn_edit.models.neurons import parse_neurons  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--extracts", type=int, default=1000)
    parser.add_argument("--chunk", type=int, default=64, help="extracts per chunk (variants alternate per chunk)")
    parser.add_argument("--neurons", default="14:100,14:7,10:512", help="neurons (default: up to the middle layer)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("-k", type=int, default=20)
    parser.add_argument("--skip-single", action="store_true", help="leave out the one-at-a-time variant")
    parser.add_argument("--json", help="also write the numbers to this file")
    args = parser.parse_args()

    torch.manual_seed(0)
    km = kn_edit.load(args.model, device=args.device)
    neurons = parse_neurons(args.neurons)
    texts = wiki_extracts(args.extracts)
    seconds = {"scan_early": 0.0, "full_forward": 0.0, "scan_full": 0.0, "scan_single": 0.0}
    tokens = 0
    same = True
    kw = dict(k=args.k, max_tokens=args.max_tokens)
    for start in range(0, len(texts), args.chunk):
        chunk = texts[start : start + args.chunk]
        t0 = time.perf_counter()
        early = top_texts(km, neurons, chunk, batch_size=args.batch_size, **kw)
        seconds["scan_early"] += time.perf_counter() - t0
        tokens += early.n_tokens
        t0 = time.perf_counter()
        with torch.no_grad():
            for b in range(0, len(chunk), args.batch_size):
                ids, mask, _ = _encode(km, chunk[b : b + args.batch_size], args.max_tokens)
                km.model(input_ids=ids, attention_mask=mask, use_cache=False)
        seconds["full_forward"] += time.perf_counter() - t0
        t0 = time.perf_counter()
        full = top_texts(km, neurons, chunk, batch_size=args.batch_size, stop_early=False, **kw)
        seconds["scan_full"] += time.perf_counter() - t0
        same &= all([h.text_id for h in a.top + a.bottom] == [h.text_id for h in b.top + b.bottom]
                    for a, b in zip(early.per_neuron, full.per_neuron))
        if not args.skip_single:
            t0 = time.perf_counter()
            top_texts(km, neurons, chunk, batch_size=1, **kw)
            seconds["scan_single"] += time.perf_counter() - t0
        print(f"{start + len(chunk)}/{len(texts)} extracts, {tokens} tokens", file=sys.stderr)
    rate = {k: tokens / v for k, v in seconds.items() if v > 0}
    last = max(n.layer for n in neurons)
    out = {
        "model": km.name, "device": args.device, "extracts": len(texts), "tokens": tokens, "neurons": args.neurons,
        "batch_size": args.batch_size, "max_tokens": args.max_tokens, "seconds": seconds, "tokens_per_second": rate,
        "layers_run_share": (last + 1) / km.n_layers,
        "speedup_early_vs_full_forward": rate["scan_early"] / rate["full_forward"],
        "speedup_early_vs_scan_full": rate["scan_early"] / rate["scan_full"],
        "speedup_batched_vs_single": rate["scan_early"] / rate["scan_single"] if "scan_single" in rate else None,
        "early_equals_full_scan": same,
    }  # fmt: skip
    print(json.dumps(out, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
