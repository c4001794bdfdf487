"""Per-phase time of one edit with `kn` (the default knowledge-neuron editor) on smollm2-135m: this checkout
against a base commit, side by side in one run, with the ratio.

Each side runs in its own process (this file with ``--worker``) that imports kn_edit from this checkout or from
the base commit's tree (``git archive`` into a temporary folder; nothing is registered in the repository). A
side loads the model, edits another fact once and reverts it (warm allocator, and warm caches of what depends on
the weights alone), then edits each timed fact under cProfile and reverts it. The sides alternate for
``--rounds`` rounds; per fact and phase the smallest time over the rounds is kept, and the table shows the mean
over the facts. Times are process CPU seconds (steadier than wall time on a shared machine; the wall total is
shown too). Phases, by the functions both versions share: locate (attribution of the fact's prompts and the
neuron selection), generic filter, least-change solve, text guard, other (the rest of the edit).

    .venv/bin/python evaluations/bench_edit_kn.py                      # against bedf235, 3 facts, 2 rounds
    .venv/bin/python evaluations/bench_edit_kn.py --against HEAD~1 --facts 1 --rounds 3 --out result.json
"""

from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# (prompts, old, new): facts smollm2-135m predicts; WARM is edited once, untimed, before the others.
WARM = (("The capital of Germany is", "The capital city of Germany is"), "Berlin", "Vienna")
FACTS = [
    (("The capital of France is", "The capital city of France is"), "Paris", "Rome"),
    (("The capital of Japan is", "The capital city of Japan is"), "Tokyo", "Seoul"),
    (("The official language of Italy is", "The official language spoken in Italy is"), "Italian", "French"),
]
# phase → (file, function) whose cumulative time it is; "other" is the edit's total minus these.
PHASES = {
    "locate": ("kn_edit/locating/locate.py", "locate_detailed"),
    "generic filter": ("kn_edit/editing/knowledge_neurons.py", "_generic"),
    "least-change solve": ("kn_edit/editing/knowledge_neurons.py", "_signed"),
    "text guard": ("kn_edit/editing/guard.py", "guard_edit"),
}
TOTAL = ("kn_edit/editing/knowledge_neurons.py", "update_fact")


def cumulative(stats, where: tuple[str, str]) -> float:
    """Cumulative seconds of the function ``where`` in a pstats.Stats (0 if it never ran)."""
    path, name = where
    return sum(v[3] for (file, _line, func), v in stats.stats.items() if func == name and file.endswith(path))


def worker(args) -> None:
    """One side: time each fact's edit; prints one JSON line."""
    import cProfile
    import pstats

    import torch

    torch.set_num_threads(args.threads)
    import kn_edit

    km = kn_edit.load("smollm2-135m", device="cpu")
    prompts, old, new = WARM
    kn_edit.update_fact(km, list(prompts), old=old, new=new).revert()
    out = []
    for prompts, old, new in FACTS[: args.facts]:
        profile = cProfile.Profile(time.process_time)
        wall = time.perf_counter()
        profile.enable()
        edit = kn_edit.update_fact(km, list(prompts), old=old, new=new)
        profile.disable()
        wall = time.perf_counter() - wall
        details = edit.report.details
        edit.revert()
        stats = pstats.Stats(profile)
        phases = {name: cumulative(stats, where) for name, where in PHASES.items()}
        total = cumulative(stats, TOTAL)
        phases["other"] = total - sum(phases.values())
        out.append({"fact": new, "phases": phases, "total": total, "wall": wall,
                    "neurons": [f"{n.layer}:{n.index}" for n in details.neurons], "scale": details.scale,
                    "text_change": details.text_change})
    print(json.dumps({"kn_edit": str(Path(kn_edit.__file__).parent), "edits": out}))


def base_tree(commit: str, into: Path) -> Path:
    """The kn_edit package of ``commit`` written under ``into`` (git archive)."""
    tar = subprocess.run(["git", "-C", str(ROOT), "archive", "--format=tar", commit, "kn_edit"], check=True,
                         capture_output=True).stdout
    with tarfile.open(fileobj=io.BytesIO(tar)) as archive:
        archive.extractall(into, filter="data")
    return into


def run_side(tree: Path, args) -> dict:
    env = {**os.environ, "PYTHONPATH": str(tree), "OMP_NUM_THREADS": str(args.threads),
           "MKL_NUM_THREADS": str(args.threads)}
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", "--threads", str(args.threads),
           "--facts", str(args.facts)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=tempfile.gettempdir())
    if done.returncode != 0:
        raise SystemExit(f"the side in {tree} failed:\n{done.stderr[-3000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    if Path(result["kn_edit"]).resolve() != (tree / "kn_edit").resolve():
        raise SystemExit(f"the side meant for {tree} imported {result['kn_edit']}")
    return result


def best(runs: list[dict]) -> list[dict]:
    """Per fact: the smallest time of each phase (and total, wall) over the rounds."""
    out = []
    for edits in zip(*(r["edits"] for r in runs)):
        phases = {p: min(e["phases"][p] for e in edits) for p in edits[0]["phases"]}
        out.append({**edits[0], "phases": phases, "total": min(e["total"] for e in edits),
                    "wall": min(e["wall"] for e in edits)})
    return out


def mean(values) -> float:
    values = list(values)
    return sum(values) / len(values)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--against", default="bedf235", help="the base commit (default bedf235)")
    parser.add_argument("--facts", type=int, default=3, choices=range(1, len(FACTS) + 1),
                        help="timed facts per side (default 3)")
    parser.add_argument("--rounds", type=int, default=2, help="alternating rounds of both sides (default 2)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    parser.add_argument("--out", default=None, help="also write the results as JSON here")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker(args)
        return
    with tempfile.TemporaryDirectory(prefix="bench_edit_kn_") as tmp:
        base = base_tree(args.against, Path(tmp))
        runs: dict[str, list[dict]] = {"old": [], "new": []}
        for i in range(args.rounds):
            for side, tree in (("old", base), ("new", ROOT)):
                print(f"round {i + 1}/{args.rounds}: {side} ...", file=sys.stderr, flush=True)
                runs[side].append(run_side(tree, args))
    old, new = best(runs["old"]), best(runs["new"])
    rows = []
    for phase in [*PHASES, "other"]:
        a, b = mean(e["phases"][phase] for e in old), mean(e["phases"][phase] for e in new)
        rows.append((phase, a, b))
    rows.append(("total (CPU)", mean(e["total"] for e in old), mean(e["total"] for e in new)))
    rows.append(("total (wall)", mean(e["wall"] for e in old), mean(e["wall"] for e in new)))
    print(f"kn edit on smollm2-135m, {args.facts} fact(s), best of {args.rounds} rounds, {args.threads} thread(s); "
          f"seconds per edit, old = {args.against}, new = this checkout")
    print(f"{'phase':<20}{'old s':>9}{'new s':>9}{'old/new':>9}")
    for phase, a, b in rows:
        print(f"{phase:<20}{a:>9.2f}{b:>9.2f}{(a / b if b > 0 else float('inf')):>8.2f}x")
    for o, n in zip(old, new):
        same = o["neurons"] == n["neurons"]
        print(f"{o['fact']}: same neurons {same}; scale {o['scale']:.6g} / {n['scale']:.6g}; "
              f"text change {o['text_change']:.6g} / {n['text_change']:.6g}")
    if args.out:
        Path(args.out).write_text(json.dumps({"args": vars(args), "old": runs["old"], "new": runs["new"],
                                              "table": rows}, indent=1))


if __name__ == "__main__":
    main()
