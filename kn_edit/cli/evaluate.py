"""`kn-edit evaluate`: run an evaluation config (configs/eval/*.yaml) and write a run directory."""

from __future__ import annotations

import argparse

from .ui import console, table


def _run_arguments(parser: argparse.ArgumentParser, config_example: str, overrides_example: str) -> None:
    parser.add_argument("--config", "-c", action="append", default=[], metavar="FILE", required=True,
                        help=f"YAML config(s), e.g. {config_example}, applied in order")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help=f"settings, e.g. {overrides_example}")
    parser.add_argument("--quiet", "-q", action="store_true", help="no progress bars")


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "evaluate",
        help="evaluate an editor on a fact set: edit success, generalization, interference, perplexity drift",
        description="Edits each fact of a data set through the configured editor, measures, reverts (or, with "
        "mode=sequential, keeps the edits and measures at checkpoints); writes per-fact JSONL, metrics JSON, a "
        "markdown report and plots to a run directory. Exits 1 when a metric regressed beyond its tolerance from "
        "the configured baseline.",
    )
    _run_arguments(parser, "configs/eval/ci_smollm2.yaml",
                   "data.facts_per_relation=2 model=gemma3-270m trainer.devices=4 mode=sequential checkpoints=[1,10]")
    parser.set_defaults(func=run_evaluate)

    compare = sub.add_parser(
        "compare",
        help="compare editing methods (kn, rome, ft, ...) on the same facts: one table, one report",
        description="Runs every method listed in the config through the same evaluation on the same edit requests "
        "and writes one report (markdown, JSON, plots). Exits 1 when a metric regressed beyond its tolerance.",
    )
    _run_arguments(compare, "configs/compare/ci_smollm2.yaml",
                   "data.facts_per_relation=2 'methods=[{method: kn}, {method: rome}]'")
    compare.add_argument("--progress", action="store_true",
                         help="compute nothing: print what the comparison has kept so far (finished methods, and a "
                         "sequential run's checkpoints, also of a stopped or still running one)")
    compare.set_defaults(func=run_compare)


def _quiet_lightning() -> None:
    import logging
    import warnings

    # Lightning's banner lines ("GPU available: ...", tips) and its advice warnings would drown the table.
    for name in ("pytorch_lightning", "lightning", "lightning.pytorch", "lightning_fabric"):
        logging.getLogger(name).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", module=r"pytorch_lightning\..*")
    warnings.filterwarnings("ignore", module=r"lightning_utilities\..*")
    warnings.filterwarnings("ignore", module=r"torchmetrics\..*")


def run_evaluate(args: argparse.Namespace) -> int:
    from ..storage.config import load_config
    from ..evaluation import EvalConfig, evaluate
    from ..evaluation.report import summary_rows
    from ..progress import default_reporter

    _quiet_lightning()
    config = load_config(EvalConfig, args.config, args.overrides).check()
    result = evaluate(config, reporter=default_reporter(args.quiet))
    if result.run_dir is None:  # not process 0 of a distributed run
        return 0
    out = console()
    s = result.summary
    if result.curve:  # mode=sequential: one row per checkpoint
        out.print(_curve_table(f"{config.name}: {config.model}, {s['editor']}, edits applied one after another "
                               f"({s['seconds']} s)", [{"n_edits": c.n_edits, **c.metrics} for c in result.curve]))
    else:
        out.print(table(f"{config.name}: {config.model}, {s['editor']}, {s['facts_edited']} facts edited "
                        f"({s['seconds']} s)", ["metric", "key", "value"], [list(r) for r in summary_rows(result.metrics)]))  # fmt: skip
    skipped = ", ".join(f"{n} {reason}" for reason, n in s["skipped"].items()) or "none"
    out.print(f"facts: {s['facts_loaded']} loaded, {s['facts_checked']} checked, {s['facts_edited']} edited; skipped: {skipped}")
    out.print(f"results: {result.run_dir}/ (facts.jsonl, metrics.json, report.md, plots)")
    return _gate(out, result.regressions, config.regression.baseline, len(config.regression.tolerances))


def _gate(out, regressions, baseline: str | None, n_checked: int) -> int:
    if not baseline:
        return 0
    if regressions:
        out.print(f"[bold red]{len(regressions)} metric(s) regressed from {baseline}:[/]")
        for r in regressions:
            out.print(f"  [red]{r}[/]", highlight=False)
        return 1
    out.print(f"[green]no regression beyond tolerance against {baseline} ({n_checked} metrics checked)[/]")
    return 0


def run_compare(args: argparse.Namespace) -> int:
    from ..storage.config import load_config
    from ..evaluation.compare import COLUMNS, compare_methods
    from ..evaluation.config import CompareConfig
    from ..evaluation.report import fmt
    from ..progress import default_reporter

    _quiet_lightning()
    config = load_config(CompareConfig, args.config, args.overrides).check()
    if args.progress:
        return _compare_progress(config)
    result = compare_methods(config, reporter=default_reporter(args.quiet))
    out = console()
    first = next(iter(result.results.values())).summary
    # one row per metric, one column per method: stays readable in 80 columns for a handful of methods
    rows = [[label] + [fmt(r.metrics.get(key)) for r in result.results.values()] for key, label in COLUMNS]
    out.print(table(f"{config.name}: {config.model}, {first['facts_edited']} facts, every method on the same requests",
                    ["metric"] + list(result.results), rows))
    out.print(f"results: {result.run_dir}/ (report.md, metrics.json, facts-METHOD.jsonl, methods.png)")
    return _gate(out, result.regressions, config.regression.baseline, len(config.regression.tolerances))


def _compare_progress(config) -> int:
    """``compare --progress``: each method's state from the comparison's kept files, a sequential method's curve."""
    from ..evaluation.kept import comparison_progress

    out = console()
    parts, kept = comparison_progress(config)
    status = [[t, v["edits_made"], v["edits_planned"], "finished" if v["finished"] else
               f"stopped or running, at edit {v['edits_made']}", v.get("seconds")] if v else [t, "", "", "nothing kept yet", ""]
              for t, v in kept.items()]  # fmt: skip
    out.print(table(f"{config.name}: what {parts} holds", ["method", "edits made", "of", "status", "wall seconds"], status))
    for title, v in kept.items():
        if v and v["curve"]:
            out.print(_curve_table(f"{title}: edits applied one after another", v["curve"]))
    return 0


def _curve_table(title: str, curve: list[dict]):
    """A sequential run's checkpoints ({"n_edits", metric: value}), one row each."""
    from ..evaluation.report import CURVE_COLUMNS, fmt

    rows = [[c["n_edits"]] + [fmt(c.get(k)) for k, _ in CURVE_COLUMNS] for c in curve]
    return table(title, ["edits"] + [t for _, t in CURVE_COLUMNS], rows)
