"""Shared rich helpers for the CLI."""

from __future__ import annotations

import argparse

from rich.console import Console
from rich.table import Table


def console() -> Console:
    return Console()


def console_err() -> Console:
    return Console(stderr=True)


def table(title: str, columns: list[str], rows: list[list[object]]) -> Table:
    out = Table(title=title, title_justify="left")
    for col in columns:
        out.add_column(col, justify="right" if col.lower() in {"p", "prob", "score", "layer", "index", "rank"} else "left")
    for row in rows:
        out.add_row(*[f"{v:.4g}" if isinstance(v, float) else str(v) for v in row])
    return out


class FiniteFloat(argparse.Action):
    """A float option that refuses NaN and infinities (argparse's float takes both) with a ConfigError naming
    the option, which main prints as one line: ``add_argument("--factor", action=FiniteFloat, default=2.0)``."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("type", float)
        super().__init__(*args, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        from ..storage.config import finite

        setattr(namespace, self.dest, finite(values, option_string or self.dest))


def add_model_argument(parser, required: bool = False) -> None:
    from ..models.provision import DEFAULT_MODEL

    parser.add_argument(
        "--model",
        "-m",
        default=None if required else DEFAULT_MODEL,
        required=required,
        help=f"offline model name (see `kn-edit models`), local folder, .gguf file or hub id (default: {DEFAULT_MODEL})",
    )
    parser.add_argument("--device", default="auto", help="auto (default), cpu, cuda, cuda:N or mps")


def add_settings_arguments(parser, config_file: str, example: str) -> None:
    """--config FILE (repeatable) and trailing key=value overrides of a command's structured config."""
    parser.add_argument("--config", action="append", default=[], metavar="FILE",
                        help=f"YAML file(s) of settings (see {config_file}), applied in order")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help=f"settings, e.g. {example}")


def add_plot_arguments(parser, what: str) -> None:
    """--plot FILE and --overwrite (an existing plot file is refused without it, before any computation)."""
    parser.add_argument("--plot", metavar="FILE.png", help=f"write {what} (the extension names the format: png, pdf, "
                                                          "svg, ...)")
    parser.add_argument("--overwrite", action="store_true", help="let --plot replace an existing file")


def check_plot_argument(args) -> None:
    """Refuse a bad --plot path (format, existing file, unwritable folder) before the model loads."""
    if args.plot:
        from ..locating.plots import check_plot_path

        check_plot_path(args.plot, args.overwrite)


def add_prompts_argument(parser, required: bool = True) -> None:
    parser.add_argument("--prompt", "-p", action="append", required=required, dest="prompts", metavar="PROMPT",
                        help="a prompt of the fact (repeat for paraphrases); causal: text before the answer, "
                             "masked LM: with [MASK] or [Y]")


def _cell(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (list, tuple)) and len(value) > 6:
        return f"{len(value)} items"
    return str(value)


def _details_parts(title: str, details: object, depth: int = 0) -> list:
    """Tables of a method's details dataclass, read generically: scalar fields as one key/value table, each
    list of dataclasses as a table of its own (one level of nesting). Fields with metadata show=False are
    skipped (e.g. copies of what the report already says)."""
    import dataclasses

    if details is None or not dataclasses.is_dataclass(details):
        return []
    scalars, parts = [], []
    for f in dataclasses.fields(details):
        if f.metadata.get("show", True) is False:
            continue
        value = getattr(details, f.name)
        if isinstance(value, list) and value and dataclasses.is_dataclass(value[0]):
            if depth == 0 and len(value) == 1:  # one request: show its fields directly
                parts += _details_parts(f"{title}: {f.name}", value[0], depth + 1)
                continue
            names = [g.name for g in dataclasses.fields(value[0]) if g.metadata.get("show", True) is not False]
            flat = [n for n in names if not isinstance(getattr(value[0], n), (list, dict))]
            parts.append(table(f"{title}: {f.name} ({len(value)})", flat, [[_cell(getattr(v, n)) for n in flat] for v in value]))
            if depth == 0:
                for i, item in enumerate(value):
                    parts += [p for p in _details_parts(f"{title}: {f.name}[{i}]", item, depth + 1) if not isinstance(p, str)]
        elif isinstance(value, dict) or (isinstance(value, list) and not value):
            continue
        else:
            scalars.append([f.name, _cell(value)])
    if scalars:
        parts.insert(0, table(title, ["", "value"], scalars))
    return parts


def report_tables(report) -> list:
    """What an edit did, from its EditReport alone (the same for every method): the parameters it changed,
    each edit prompt's verdict and margin, cost (time per phase), and the method's own details."""
    from ..editing.report import format_timings

    params = [[p.name, "all" if p.whole else f"{p.slices} of {p.size}", p.elements] for p in report.parameters]
    parts: list = [table(f"{report.method}: parameters changed", ["parameter", "slices", "elements"], params)]
    prompts = [[p.prompt, repr(p.target), "yes" if p.success else "no", p.margin] for p in report.prompts]
    verdict = "erased" if report.prompts and report.prompts[0].erasure else "holds"
    parts.append(table("edit prompts after the edit", ["prompt", "target", verdict, "margin (logits)"], prompts))
    parts += _details_parts(f"{report.method} details", report.details)
    parts.append(f"{report.method} time: {format_timings(report.seconds, report.timings)}")
    if report.peak_memory_mb is not None:
        parts.append(f"{report.method} peak memory: {report.peak_memory_mb:.0f} MB ({report.memory_kind})")
    return parts
