"""Shared rich helpers for the CLI."""

from __future__ import annotations

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


def add_model_argument(parser, required: bool = False) -> None:
    from ..provision import DEFAULT_MODEL

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


def add_prompts_argument(parser) -> None:
    parser.add_argument("--prompt", "-p", action="append", required=True, dest="prompts", metavar="PROMPT",
                        help="a prompt of the fact (repeat for paraphrases); causal: text before the answer, "
                             "masked LM: with [MASK] or [Y]")
