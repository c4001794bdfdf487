"""Benchmark kn_edit.attribute against the per-layer integrated-gradients shape of public implementations.

Default mode: on (a) a random-weight GPT-2-small-shaped model (12 layers, d_model 768, d_ff 3072, the
smollm2 tokenizer's vocabulary) and (b) smollm2-135m, one prompt of ``--prompt-tokens`` tokens, ``--steps``
Riemann steps, all layers. The baseline is the same formula computed the way EleutherAI's knowledge-neurons
and the authors' code do it: per layer, one clean forward to read w, then the ``steps`` scaled copies of the
whole prompt as one batch, forward (full logits) and backward. Reported: both times, the speed ratio and
max |kn_edit - baseline| / max |baseline| (difference relative to the largest score).

``--throughput``: facts per second for attributing all layers over N ParaRel facts with all their causal
prompts on smollm2 (meant for a GPU; runs on CPU with a small N), and the peak accelerator memory.

``--stability M [M ...]``: how far the knowledge neurons the ``kn`` editor selects (``locate`` with its defaults:
threshold 0.2 of the prompt's top score, kept on at least half the prompts, up to 3 edit prompts) move when the
Riemann sum has M steps instead of 20: over N ParaRel facts smollm2 predicts (top-1 on the first prompt), the share
of facts whose selection is identical, the mean Jaccard overlap, and the attribution time against m = 20.

    .venv/bin/python evaluations/bench_attribution.py
    .venv/bin/python evaluations/bench_attribution.py --throughput --facts 4 --device cuda
    .venv/bin/python evaluations/bench_attribution.py --stability 5 10 --facts 24
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import kn_edit  # noqa: E402
from kn_edit.models.prompts import AnswerStep  # noqa: E402

LONG_TEXT = (
    "In the early years of the twentieth century the famous French engineer who designed the tower in Paris "
    "moved with his family to the south of the country"
)


def per_layer_baseline(km, step: AnswerStep, steps: int, layers: list[int]) -> torch.Tensor:
    """The public-implementation shape: per layer a clean forward, then `steps` full-prompt copies in one batch."""
    ids = step.input_ids.unsqueeze(0).to(km.device)
    t, y = step.position, step.target_id
    out = []
    for layer in layers:
        proj = km.value_proj(layer)
        seen = {}
        handle = proj.register_forward_pre_hook(lambda _m, a: seen.setdefault("w", a[0][0, t].detach().clone()))
        try:
            with torch.no_grad():
                km.model(input_ids=ids)
        finally:
            handle.remove()
        w = seen["w"]
        alphas = torch.arange(steps, device=km.device, dtype=w.dtype) / steps
        x = (alphas[:, None] * w).requires_grad_(True)  # [steps, d_ff]

        def replace(_module, args):
            act = args[0].clone()
            act[:, t] = x
            return (act, *args[1:])

        handle = proj.register_forward_pre_hook(replace)
        try:
            with torch.enable_grad():
                logits = km.model(input_ids=ids.expand(steps, -1)).logits  # [steps, seq, vocab]
                probs = torch.softmax(logits[:, t].float(), dim=-1)[:, y]
                (grad,) = torch.autograd.grad(probs.sum(), x)
        finally:
            handle.remove()
        out.append((w.float() * grad.float().sum(dim=0) / steps).cpu())
    return torch.stack(out)


def prompt_of_length(tokenizer, n_tokens: int) -> str:
    """The longest word prefix of LONG_TEXT with at most n_tokens tokens."""
    words = LONG_TEXT.split()
    best = words[0]
    for i in range(1, len(words) + 1):
        text = " ".join(words[:i])
        if len(tokenizer(text, add_special_tokens=True)["input_ids"]) <= n_tokens:
            best = text
    return best


def gpt2_small_random(tokenizer, device: str):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
    cfg = GPT2Config(vocab_size=len(tokenizer), n_layer=12, n_embd=768, n_head=12, n_inner=3072, n_positions=1024,
                     bos_token_id=eos, eos_token_id=eos)  # fmt: skip
    model = GPT2LMHeadModel(cfg).float().eval()
    return kn_edit.wrap(model.to(device), tokenizer, name="gpt2-small-random")


def time_call(fn, repeats: int):
    """(best wall seconds, best process CPU seconds, result). CPU time is reported too because on a shared
    machine wall time also counts the time other processes held the cores."""
    best_wall, best_cpu, result = float("inf"), float("inf"), None
    for _ in range(repeats):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        wall, cpu = time.perf_counter(), time.process_time()
        result = fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        best_wall = min(best_wall, time.perf_counter() - wall)
        best_cpu = min(best_cpu, time.process_time() - cpu)
    return best_wall, best_cpu, result


def compare(km, prompt: str, target: str, steps: int, repeats: int, batch_size: int | None) -> dict:
    step = km.encode(prompt, target).steps[0]
    layers = list(range(km.n_layers))
    # Warm-up (allocator, kernels) for both, on little work.
    kn_edit.attribute(km, prompt, target, steps=2, layers=[0], batch_size=batch_size)
    per_layer_baseline(km, step, 2, [0])
    t_fast, cpu_fast, fast = time_call(
        lambda: kn_edit.attribute(km, prompt, target, steps=steps, batch_size=batch_size), repeats
    )
    t_ref, cpu_ref, ref = time_call(lambda: per_layer_baseline(km, step, steps, layers), repeats)
    scale = float(ref.abs().max())
    return {
        "model": km.name,
        "tokens": len(step.input_ids),
        "layers": km.n_layers,
        "t_kn": t_fast,
        "t_ref": t_ref,
        "speedup": t_ref / t_fast,
        "cpu_speedup": cpu_ref / cpu_fast,
        "max_rel_diff": float((fast - ref).abs().max()) / scale,
        "max_score": scale,
    }


def print_table(title: str, columns: list[str], rows: list[list[str]]) -> None:
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        print(title)
        print(" | ".join(columns))
        for r in rows:
            print(" | ".join(r))
        return
    table = Table(title=title)
    for c in columns:
        table.add_column(c, justify="right" if c != "model" else "left")
    for r in rows:
        table.add_row(*r)
    Console(width=max(140, Console().width)).print(table)


def run_compare(args) -> None:
    smollm2 = kn_edit.load("smollm2-135m", device=args.device)
    models = {"gpt2-small-random": lambda: gpt2_small_random(smollm2.tokenizer, args.device), "smollm2-135m": lambda: smollm2}
    prompt = prompt_of_length(smollm2.tokenizer, args.prompt_tokens)
    print(f"prompt ({args.steps} steps): {prompt!r} -> {args.target!r}; torch threads: {torch.get_num_threads()}")
    rows = []
    for name in args.models:
        r = compare(models[name](), prompt, args.target, args.steps, args.repeats, args.batch_size)
        rows.append([r["model"], str(r["tokens"]), str(r["layers"]), f"{r['t_kn']:.2f}", f"{r['t_ref']:.2f}",
                     f"{r['speedup']:.1f}x", f"{r['cpu_speedup']:.1f}x", f"{r['max_rel_diff']:.1e}"])  # fmt: skip
    print_table(
        "integrated gradients, all layers (wall seconds, best of %d)" % args.repeats,
        ["model", "tokens", "layers", "kn_edit s", "per-layer ref s", "speed-up", "CPU-time speed-up",
         "max|diff|/max|ref|"],  # fmt: skip
        rows,
    )


def pararel_facts(root: Path, n: int, seed: int):
    from kn_edit.data import load_pararel

    facts = load_pararel(root, masked=False, heldout_fraction=0.0, download=False).records
    return random.Random(seed).sample(facts, min(n, len(facts)))


def run_throughput(args) -> None:
    km = kn_edit.load("smollm2-135m", device=args.device)
    facts = pararel_facts(Path(args.pararel), args.facts, args.seed)
    cuda = km.device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats(km.device)
    first = facts[0]
    kn_edit.attribute_prompts(km, first.all_prompts[:1], first.object, steps=2, layers=[0])  # warm-up
    n_prompts = sum(len(f.all_prompts) for f in facts)
    if cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    for i in range(0, len(facts), args.facts_per_call):
        chunk = facts[i : i + args.facts_per_call]
        if len(chunk) == 1:
            kn_edit.attribute_prompts(km, chunk[0].all_prompts, chunk[0].object, steps=args.steps,
                                      batch_size=args.batch_size)  # fmt: skip
        else:  # several facts in one batched call: their answer steps side by side
            answer_steps = [s for f in chunk for p in f.all_prompts for s in km.encode(p, f.object).steps]
            kn_edit.attribute_steps(km, answer_steps, steps=args.steps, batch_size=args.batch_size)
    if cuda:
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    peak = f"{torch.cuda.max_memory_allocated(km.device) / 2**30:.2f} GiB" if cuda else "n/a (cpu)"
    device = torch.cuda.get_device_name(km.device) if cuda else f"cpu ({torch.get_num_threads()} threads)"
    print_table(
        f"ParaRel attribution throughput, smollm2-135m, all {km.n_layers} layers, {args.steps} steps",
        ["device", "facts", "prompts", "facts/call", "seconds", "facts/s", "prompts/s", "peak memory"],
        [[device, str(len(facts)), str(n_prompts), str(args.facts_per_call), f"{elapsed:.2f}",
          f"{len(facts) / elapsed:.3f}", f"{n_prompts / elapsed:.2f}", peak]],  # fmt: skip
    )


def known_facts(km, root: Path, n: int, seed: int, scan: int = 400):
    """Up to ``n`` of ``scan`` sampled ParaRel facts whose object's first token is the model's top-1 on the first
    prompt."""
    out = []
    for fact in pararel_facts(root, scan, seed):
        step = km.encode(fact.prompts[0], fact.object).steps[0]
        if int(km.step_logits([step])[0].argmax()) == step.target_id:
            out.append(fact)
            if len(out) == n:
                break
    return out


def stability(km, facts, counts) -> dict:
    """{m: (selections [per fact], seconds)} of ``locate`` with the kn editor's defaults at each step count m."""
    out = {}
    for m in counts:
        selections, seconds = [], 0.0
        for fact in facts:
            start = time.perf_counter()
            selections.append(set(kn_edit.locate(km, list(fact.prompts[:3]), fact.object, steps=m)))
            seconds += time.perf_counter() - start
        out[m] = (selections, seconds)
    return out


def stability_rows(found: dict, reference: int = 20) -> list[list[str]]:
    """Per m: identical selections (of the facts), mean Jaccard overlap, neurons per fact, seconds, speed."""
    ref, ref_seconds = found[reference]
    rows = []
    for m, (selections, seconds) in sorted(found.items()):
        same = sum(a == b for a, b in zip(selections, ref))
        jaccard = [len(a & b) / len(a | b) if a | b else 1.0 for a, b in zip(selections, ref)]
        rows.append([str(m), f"{same}/{len(ref)}", f"{sum(jaccard) / len(jaccard):.3f}",
                     f"{sum(len(a) for a in selections) / len(ref):.1f}", f"{seconds:.1f}",
                     f"{ref_seconds / seconds:.2f}x"])  # fmt: skip
    return rows


def run_stability(args) -> None:
    km = kn_edit.load("smollm2-135m", device=args.device)
    facts = known_facts(km, Path(args.pararel), args.facts, args.seed)
    kn_edit.attribute(km, facts[0].prompts[0], facts[0].object, steps=2, layers=[0])  # warm-up
    found = stability(km, facts, sorted({20, *args.stability}))
    print_table(f"kn's selected neurons at m steps against m = 20: smollm2-135m, {len(facts)} known ParaRel facts "
                f"(seed {args.seed}), up to 3 edit prompts each",
                ["m", "same selection", "mean Jaccard", "neurons per fact", "seconds", "speed vs m=20"],
                stability_rows(found))  # fmt: skip


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=20, help="Riemann steps m (default 20)")
    parser.add_argument("--prompt-tokens", type=int, default=10, help="prompt length in tokens (default 10)")
    parser.add_argument("--target", default=" Paris")
    parser.add_argument("--models", nargs="+", default=["gpt2-small-random", "smollm2-135m"],
                        choices=["gpt2-small-random", "smollm2-135m"])  # fmt: skip
    parser.add_argument("--repeats", type=int, default=1, help="timed runs per method; the best is reported")
    parser.add_argument("--batch-size", type=int, default=None, help="rows per pass for kn_edit (default: auto)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    parser.add_argument("--throughput", action="store_true", help="ParaRel facts/second instead of the comparison")
    parser.add_argument("--facts", type=int, default=3, help="throughput / stability: number of ParaRel facts (default 3)")
    parser.add_argument("--stability", type=int, nargs="+", default=None, metavar="M",
                        help="the kn editor's selected neurons at these step counts against m = 20")
    parser.add_argument("--facts-per-call", type=int, default=1, help="throughput: facts batched per call")
    parser.add_argument("--seed", type=int, default=0, help="throughput: which facts are sampled")
    parser.add_argument("--pararel", default=str(ROOT.parent / "shared" / "data" / "pararel"),
                        help="ParaRel folder with patterns/ and facts/")  # fmt: skip
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: torch's choice; 1 is steadier on a busy machine)")  # fmt: skip
    args = parser.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.stability:
        run_stability(args)
    elif args.throughput:
        run_throughput(args)
    else:
        run_compare(args)


if __name__ == "__main__":
    main()
