"""Benchmark one edit per method: where its time goes (``EditReport.timings``) and, with ``--against REV``, how
long commit REV's code takes for the same edits on the same machine right after.

The facts are the CI comparison's (``configs/compare/ci_smollm2.yaml``: its model, data and the new objects
its evaluation asks for), the first ``--facts`` of them taken relation by relation. Each method runs in a fresh
subprocess with one thread (``torch.set_num_threads(1)``): the model loaded, one untimed warm-up edit on the
first fact (key statistics, prefixes and any other cache filled), then every fact edited and reverted, each
``Editor.apply`` timed by the wall clock and by the process's CPU time (which other jobs on a shared machine
disturb much less: the worker has one thread). With ``--against``, commit REV is checked out in a temporary
``git worktree`` and the same worker runs on its code right after each method's run on this code (method by
method, so both see about the same load); REV's reports may have no timings, so the two are compared on
seconds per edit (wall and CPU): the ratios are REV's over this code's (> 1: this code is faster). Each edit's
weight change (the norm of every patch's after − before) is kept too: against REV, the largest relative
difference per fact says whether both made the same edit (float rounding) or not. (Whole key-value edits
against a base commit, formerly ``bench_value_step.py --edit``, are ``--methods rome,memit,kn-subject
--against REV``.)

``--profile`` (``kn`` and its presets ``kn-paper``, ``kn-unscaled``) also splits each timed edit by the functions both versions share, from a cProfile
of the edit in CPU seconds, for a REV whose reports carry no timings (formerly ``bench_edit_kn.py``): locate
(attribution of the fact's prompts and the neuron selection), generic filter, least-change solve, text guard,
other; per phase the table shows the mean over the facts of each fact's smallest time over the ``--repeat``
runs.

    .venv/bin/python evaluations/bench_edit.py --facts 2
    .venv/bin/python evaluations/bench_edit.py --facts 2 --methods kn,rome --against bedf235 --out bench.json
    .venv/bin/python evaluations/bench_edit.py --methods kn --profile --facts 3 --repeat 3 --against bedf235
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_METHODS = "kn,kn-subject,rome,memit,ft,ft-m"
CONFIG = ROOT / "configs" / "compare" / "ci_smollm2.yaml"
# --profile: phase → (file, function) whose cumulative time in a kn edit it is (the same names at bedf235);
# "other" is the profiled edit's total minus these.
PROFILE_PHASES = {
    "locate": ("kn_edit/locating/locate.py", "locate_detailed"),
    "generic filter": ("kn_edit/editing/knowledge_neurons.py", "_generic"),
    "least-change solve": ("kn_edit/editing/knowledge_neurons.py", "_signed"),
    "text guard": ("kn_edit/editing/guard.py", "guard_edit"),
}
PROFILED = ("kn", "kn-paper", "kn-unscaled")  # the KnowledgeNeuronEditor presets: the phases are its functions


# ----- the worker: one method's edits on one checkout's code (runs in its own process) -------------------------
def cumulative(stats, where: tuple[str, str]) -> float:
    """Cumulative seconds of the function ``where`` in a pstats.Stats (0 if it never ran)."""
    path, name = where
    return sum(v[3] for (file, _line, func), v in stats.stats.items() if func == name and file.endswith(path))


def work(code: Path, model: str, method: str, settings: list[str], requests: list[dict], threads: int,
         profile: bool = False) -> dict:
    """Load ``model`` with the kn_edit of ``code``, warm up on the first request, then time every request
    (``profile``: under cProfile, split by ``PROFILE_PHASES``)."""
    sys.path.insert(0, str(code))
    import cProfile
    import pstats

    import torch

    import kn_edit
    from kn_edit.editing import EditRequest, make_editor
    from kn_edit.errors import KnEditError

    torch.set_num_threads(threads)
    km = kn_edit.load(model, device="cpu")
    editor = make_editor(method, overrides=settings)
    edits = [EditRequest(tuple(r["prompts"]), r["old"], r["new"], subject=r["subject"], relation=r["relation"])
             for r in requests]

    def timed(request, profiled: bool = False) -> dict:
        start, cpu, error, report, change = time.perf_counter(), time.process_time(), None, None, None
        profiler = cProfile.Profile(time.process_time) if profiled else None
        try:
            with torch.enable_grad():
                if profiler is not None:
                    profiler.enable()
                try:
                    edit = editor.apply(km, [request])
                finally:
                    if profiler is not None:
                        profiler.disable()
            report = edit.report
            change = sum(float((p.after.double() - p.before.double()).norm()) ** 2 for p in edit.patches) ** 0.5
            edit.revert()
        except KnEditError as exc:  # a refused edit costs its time too; the model is unchanged
            error = f"{type(exc).__name__}: {exc}"
        wall, cpu = time.perf_counter() - start, time.process_time() - cpu
        found = {"fact": f"{request.subject}: {request.old} -> {request.new}", "wall": wall, "cpu": cpu,
                 "error": error, "seconds": None if report is None else report.seconds,
                 "timings": None if report is None else getattr(report, "timings", None),
                 "success": None if report is None else report.success, "change": change}  # fmt: skip
        if profiler is not None:
            stats = pstats.Stats(profiler)
            phases = {name: cumulative(stats, where) for name, where in PROFILE_PHASES.items()}
            found["profile"] = phases | {"other": stats.total_tt - sum(phases.values())}
            found["profile_total"] = stats.total_tt
        return found

    warm = timed(edits[0])
    return {"method": method, "warm_up": warm["wall"], "edits": [timed(r, profile) for r in edits]}


# ----- the driver -----------------------------------------------------------------------------------------------
def select_requests(config_path: Path, data: str | None, n: int) -> tuple[str, list[dict]]:
    """(model, the first ``n`` edit requests of the comparison's cases, taken relation by relation)."""
    sys.path.insert(0, str(ROOT))
    import torch

    from kn_edit.evaluation.config import CompareConfig
    from kn_edit.evaluation.datamodule import FactDataModule
    from kn_edit.models.loading import load
    from kn_edit.storage.config import load_config

    torch.set_num_threads(1)
    config = load_config(CompareConfig, [config_path], [f"data.path={data}"] if data else []).check()
    km = load(config.model, device="cpu")
    datamodule = FactDataModule(km, config.data)
    datamodule.setup("test")
    by_relation: dict[str, list] = defaultdict(list)
    for case in datamodule.cases:
        by_relation[case.fact.relation].append(case.request)
    chosen = []
    for round_ in range(max(map(len, by_relation.values()), default=0)):
        chosen += [group[round_] for group in by_relation.values() if round_ < len(group)]
    return config.model, [{"prompts": list(r.prompts), "old": r.old, "new": r.new, "subject": r.subject,
                           "relation": r.relation} for r in chosen[:n]]


def run_worker(code: Path, model: str, method: str, settings: list[str], requests: list[dict], threads: int,
               profile: bool = False) -> dict:
    """``work`` in a fresh Python process (its own imports of ``code``'s kn_edit), one thread."""
    with tempfile.TemporaryDirectory() as tmp:
        job, out = Path(tmp) / "job.json", Path(tmp) / "out.json"
        job.write_text(json.dumps({"code": str(code), "model": model, "method": method, "settings": settings,
                                   "requests": requests, "threads": threads, "profile": profile}))
        env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), PYTHONPATH=str(code))
        subprocess.run([sys.executable, str(Path(__file__).resolve()), "--worker", str(job), str(out)], env=env,
                       check=True, cwd=code)
        return json.loads(out.read_text())


def joined(runs: list[dict]) -> dict:
    """One method's repeated runs as one: every timed edit of each, the mean warm-up, and their summary."""
    run = {"method": runs[0]["method"], "warm_up": mean([r["warm_up"] for r in runs]),
           "edits": [e for r in runs for e in r["edits"]]}
    return run | {"summary": summary(run)}


def mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


def summary(run: dict) -> dict:
    """Per method: mean wall seconds per edit, mean report seconds, mean seconds per phase (when reported), and
    with --profile the mean over the facts of each fact's smallest profiled time per phase over the runs."""
    from kn_edit.evaluation.report import phase_order

    edits = run["edits"]
    timings = [e["timings"] for e in edits if e["timings"]]
    phases = phase_order(timings) if timings else []
    found = {"wall": mean([e["wall"] for e in edits]), "cpu": mean([e["cpu"] for e in edits]), "warm_up": run["warm_up"],
             "seconds": mean([e["seconds"] for e in edits if e["seconds"] is not None]),
             "phases": {p: mean([t.get(p, 0.0) for t in timings]) for p in phases},
             "held": sum(bool(e["success"]) for e in edits), "refused": sum(e["error"] is not None for e in edits),
             "n": len(edits)}  # fmt: skip
    profiled: dict[str, list[dict]] = defaultdict(list)  # fact → its profiled edits, one per run
    for e in edits:
        if e.get("profile"):
            profiled[e["fact"]].append(e["profile"] | {"total (CPU)": e["profile_total"], "total (wall)": e["wall"]})
    if profiled:
        names = list(next(iter(profiled.values()))[0])
        found["profile"] = {p: mean([min(r[p] for r in runs) for runs in profiled.values()]) for p in names}
    return found


def change_difference(ours: list[dict], theirs: list[dict]) -> float | None:
    """The largest relative difference of a fact's weight change between two codes' edits (None: none to compare)."""
    changes = defaultdict(list)
    for e in ours + theirs:
        if e.get("change") is not None:
            changes[e["fact"]].append(e["change"])
    worst = [(max(c) - min(c)) / max(max(c), 1e-30) for c in changes.values() if len(c) > 1]
    return max(worst) if worst else None


def print_tables(results: dict, against: str | None) -> None:
    """Seconds per edit by phase (a column per method, this code), and with ``against`` this code against REV."""
    from rich.console import Console
    from rich.table import Table

    from kn_edit.evaluation.report import phase_order

    con = Console()
    ours = {m: r["summary"] for m, r in results["methods"].items()}
    table = Table(title=f"mean seconds per edit, this code: {results['facts']} facts, {results['threads']} thread(s)",
                  title_justify="left")
    for column in ["", *ours]:
        table.add_column(column, justify="right" if column else "left")
    table.add_row("wall clock", *(f"{s['wall']:.2f}" for s in ours.values()))
    table.add_row("CPU (process)", *(f"{s['cpu']:.2f}" for s in ours.values()))
    table.add_row("report.seconds", *(f"{s['seconds']:.2f}" for s in ours.values()), end_section=True)
    for phase in phase_order(s["phases"] for s in ours.values()):
        table.add_row(phase, *(f"{s['phases'][phase]:.2f}" if phase in s["phases"] else "-" for s in ours.values()))
    con.print(table)
    if against:
        table = Table(title=f"seconds per edit: this code against {against} (ratio: {against} / this code)",
                      title_justify="left")
        for column in ["method", "wall", f"wall {against}", "ratio", "CPU", f"CPU {against}", "ratio", "held"]:
            table.add_column(column, justify="left" if column == "method" else "right")
        for method, r in results["methods"].items():
            new, old = r["summary"], r["against"]["summary"]
            table.add_row(method, f"{new['wall']:.2f}", f"{old['wall']:.2f}", f"{r['ratio']:.2f}", f"{new['cpu']:.2f}",
                          f"{old['cpu']:.2f}", f"{r['cpu_ratio']:.2f}", f"{new['held']}/{old['held']} of {old['n']}")
        con.print(table)
        differences = {m: r.get("change_difference") for m, r in results["methods"].items()}
        con.print("largest relative difference of a fact's weight change, this code against " + against + ": "
                  + ", ".join(f"{m} {'n/a' if d is None else f'{d:.2g}'}" for m, d in differences.items()))
    for method, r in results["methods"].items():
        if "profile" not in r["summary"]:
            continue
        old = r.get("against", {}).get("summary", {}).get("profile")
        title = f"{method}: CPU seconds per edit by profiled phase (mean over facts of the best of {results['repeat']} run(s))"
        table = Table(title=title, title_justify="left")
        for column in ["phase", "this code"] + ([against, f"{against} / this code"] if old else []):
            table.add_column(column, justify="left" if column == "phase" else "right")
        for phase, value in r["summary"]["profile"].items():
            cells = [f"{value:.2f}"]
            if old:
                cells += [f"{old[phase]:.2f}", f"{old[phase] / value:.2f}" if value > 0 else "inf"]
            table.add_row(phase, *cells)
        con.print(table)


class Worktree:
    """Commit ``rev`` checked out (detached) in a temporary ``git worktree``, removed on exit."""

    def __init__(self, rev: str) -> None:
        self.rev = rev
        self.path = Path(tempfile.mkdtemp(prefix="bench-edit-")) / "code"

    def __enter__(self) -> Path:
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(self.path), self.rev], check=True,
                       stdout=subprocess.DEVNULL)
        return self.path

    def __exit__(self, *exc) -> None:
        subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(self.path)], check=False)
        subprocess.run(["git", "-C", str(ROOT), "worktree", "prune"], check=False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", default=DEFAULT_METHODS, help=f"comma-separated (default {DEFAULT_METHODS})")
    parser.add_argument("--facts", type=int, default=2, help="facts timed per method (after one warm-up edit)")
    parser.add_argument("--config", default=str(CONFIG), help="the comparison whose model and facts are used")
    parser.add_argument("--data", help="ParaRel folder, if not the config's data.path (relative to the cwd)")
    parser.add_argument("--set", action="append", default=[], metavar="METHOD:KEY=VALUE",
                        help="a method setting, e.g. rome:steps=10 (repeatable)")
    parser.add_argument("--against", metavar="REV", help="also time commit REV's code (git worktree) right after")
    parser.add_argument("--repeat", type=int, default=1,
                        help="runs per method (and per REV), alternating which goes first; each edit counts once")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--profile", action="store_true", help="also split each edit by profiled phase (kn, kn-paper, kn-unscaled)")
    parser.add_argument("--out", help="write the results (JSON) here")
    parser.add_argument("--worker", nargs=2, metavar=("JOB", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        job = json.loads(Path(args.worker[0]).read_text())
        Path(args.worker[1]).write_text(json.dumps(work(Path(job["code"]), job["model"], job["method"], job["settings"],
                                                        job["requests"], job["threads"], job["profile"])))
        return
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    if args.profile and set(methods) - set(PROFILED):
        parser.error(f"--profile splits the edits of {', '.join(PROFILED)} only (its phases are those functions)")
    settings: dict[str, list[str]] = defaultdict(list)
    for item in args.set:
        method, _, setting = item.partition(":")
        settings[method].append(setting)
    model, requests = select_requests(Path(args.config), args.data, args.facts)
    results = {"model": model, "facts": len(requests), "requests": requests, "threads": args.threads,
               "against": args.against, "repeat": args.repeat, "profile": args.profile, "methods": {},
               "started": time.strftime("%Y-%m-%d %H:%M:%S")}  # fmt: skip
    with contextlib.ExitStack() as stack:
        old_code = stack.enter_context(Worktree(args.against)) if args.against else None
        for method in methods:
            runs: dict[str, list[dict]] = {"this": [], "against": []}
            for round_ in range(args.repeat):  # this code then REV, then the other way round, ...
                order = ["this", "against"] if old_code is not None else ["this"]
                for which in order if round_ % 2 == 0 else order[::-1]:
                    print(f"{method}: {'this code' if which == 'this' else args.against} ...", flush=True)
                    code = ROOT if which == "this" else old_code
                    runs[which].append(run_worker(code, model, method, settings[method], requests, args.threads,
                                                  args.profile))
            run = joined(runs["this"])
            if old_code is not None:
                run["against"] = joined(runs["against"])
                run["ratio"] = run["against"]["summary"]["wall"] / run["summary"]["wall"]
                run["cpu_ratio"] = run["against"]["summary"]["cpu"] / run["summary"]["cpu"]
                run["change_difference"] = change_difference(run["edits"], run["against"]["edits"])
            results["methods"][method] = run
    print_tables(results, args.against)
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
