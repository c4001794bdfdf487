"""`kn-edit evaluate`: run an evaluation config (configs/eval/*.yaml) and write a run directory."""

from __future__ import annotations

import argparse

from .ui import console, table


def _run_arguments(parser: argparse.ArgumentParser, config_example: str, overrides_example: str,
                   config_required: bool = True) -> None:
    parser.add_argument("--config", "-c", action="append", default=[], metavar="FILE", required=config_required,
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
    compare.add_argument("--report", metavar="DIR", help="with --progress: also write what is kept as a report "
                         "folder (curves.json, curves.png, facts-METHOD.jsonl, report.md, config.yaml, manifest.json)")
    compare.add_argument("--merge", metavar="DIR", help="with --progress: join the methods of an earlier --report "
                         "folder that the comparison has kept nothing of (runs whose parts folder is gone)")
    compare.add_argument("--overwrite", action="store_true", help="let --report replace an existing folder (the "
                         "--merge folder itself may always be rewritten)")
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
    from ..errors import ConfigError
    from ..storage.config import load_config
    from ..evaluation.compare import COLUMNS, compare_methods
    from ..evaluation.config import CompareConfig
    from ..evaluation.report import fmt
    from ..progress import default_reporter

    _quiet_lightning()
    if not args.progress and (args.report or args.merge or args.overwrite):
        raise ConfigError("--report, --merge and --overwrite go with --progress (they write what a comparison kept)")
    config = load_config(CompareConfig, args.config, args.overrides).check()
    if args.progress:
        return _compare_progress(config, args)
    result = compare_methods(config, reporter=default_reporter(args.quiet))
    if result.run_dir is None:  # not process 0 of a distributed run
        return 0
    out = console()
    first = next(iter(result.results.values())).summary
    # one row per metric, one column per method: stays readable in 80 columns for a handful of methods
    rows = [[label] + [fmt(r.metrics.get(key)) for r in result.results.values()] for key, label in COLUMNS]
    out.print(table(f"{config.name}: {config.model}, {first['facts_edited']} facts, every method on the same requests",
                    ["metric"] + list(result.results), rows))
    out.print(f"results: {result.run_dir}/ (report.md, metrics.json, facts-METHOD.jsonl, methods.png)")
    return _gate(out, result.regressions, config.regression.baseline, len(config.regression.tolerances))


def _compare_progress(config, args: argparse.Namespace) -> int:
    """``compare --progress``: each method's state from the comparison's kept files (and an earlier report's,
    ``--merge``), a sequential method's curve; ``--report DIR`` writes them as a report folder."""
    from pathlib import Path

    from ..evaluation.kept import comparison_progress, joined, read_report, write_report
    from ..storage.manifest import start_manifest

    merge = Path(args.merge) if args.merge else None
    target = Path(args.report) if args.report else None
    replace = target is not None and (args.overwrite or (merge is not None and _same_path(target, merge)))
    if target is not None:  # before anything is read: a bad folder fails at once
        _check_report_folder(target, replace)
    provenance = start_manifest() if target is not None else None  # the code and command as the report starts
    out = console()
    parts, kept = comparison_progress(config)
    earlier = read_report(merge) if merge is not None else {}
    methods = joined({t: v for t, v in kept.items() if v}, earlier)
    shown = methods | {t: None for t in kept if t not in methods}
    status = [[t, v["edits_made"], v["edits_planned"], ("finished" if v["finished"] else
               f"stopped or running, at edit {v['edits_made']}") + (f" (from {merge})" if t in earlier and not kept.get(t) else ""),
               v.get("seconds")] if v else [t, "", "", "nothing kept yet", ""]
              for t, v in shown.items()]  # fmt: skip
    where = f"{parts}" + (f" and {merge}" if merge is not None else "")
    out.print(table(f"{config.name}: what {where} holds", ["method", "edits made", "of", "status", "wall seconds"], status))
    for title, v in shown.items():
        if v and v["curve"]:
            out.print(_curve_table(f"{title}: edits applied one after another", v["curve"]))
    if target is not None:
        from_merge = [t for t in methods if t in earlier and not kept.get(t)]
        write_report(target, config.name, methods, _config_text(args), overwrite=replace, provenance=provenance,
                     parts=str(parts), merged_from=None if merge is None else str(merge), methods_from_merge=from_merge)
        out.print(f"wrote {target}: " + ", ".join(f"{m} {v['edits_made']} edits" for m, v in methods.items()))
    return 0


def _same_path(a, b) -> bool:
    return a.expanduser().resolve() == b.expanduser().resolve()


def _check_report_folder(target, replace: bool) -> None:
    """--report's folder: new, or (``replace``: --overwrite, or the --merge folder itself) an existing folder."""
    import os

    from ..errors import EditError
    from ..storage.atomic import check_writable

    if os.path.lexists(target):
        if not replace:
            raise EditError(f"{target} already exists; choose a new report folder, or pass --overwrite to replace it "
                            "(nothing was written)")
        if not target.is_dir() or target.is_symlink():
            raise EditError(f"{target} exists and is not a folder; choose a new report folder (nothing was written)")
    check_writable(target)


# Overrides that only say where a comparison keeps its results, not what it computes.
_NAMING = ("name", "run_name", "output_dir", "resume")


def _config_text(args: argparse.Namespace) -> str:
    """The report's config.yaml: the config file as written (comments kept) where it alone says what the
    comparison computes (one file, overrides only of ``_NAMING``); else the resolved config."""
    from pathlib import Path

    from ..evaluation.config import CompareConfig
    from ..storage.config import load_config, to_yaml

    if len(args.config) == 1 and all(o.split("=", 1)[0].strip() in _NAMING for o in args.overrides):
        return Path(args.config[0]).read_text()
    return to_yaml(load_config(CompareConfig, args.config, args.overrides))


def _curve_table(title: str, curve: list[dict]):
    """A sequential run's checkpoints ({"n_edits", metric: value}), one row each."""
    from ..evaluation.report import CURVE_COLUMNS, fmt

    rows = [[c["n_edits"]] + [fmt(c.get(k)) for k, _ in CURVE_COLUMNS] for c in curve]
    return table(title, ["edits"] + [t for _, t in CURVE_COLUMNS], rows)
