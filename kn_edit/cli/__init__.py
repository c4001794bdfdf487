"""The ``kn-edit`` command line. Each command lives in its own module with ``register(subparsers)``;
the module sets ``func`` on its parser. rich is used only in this layer."""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from typing import Sequence

# Command modules, in the order `kn-edit --help` lists them.
COMMAND_MODULES = (
    "kn_edit.cli.edit",  # update-fact first: the toolkit's main job
    "kn_edit.cli.locate",
    "kn_edit.cli.analyze",
    "kn_edit.cli.evaluate",
    "kn_edit.cli.predict",
)


def build_parser() -> argparse.ArgumentParser:
    from .. import __version__

    parser = argparse.ArgumentParser(
        prog="kn-edit",
        description="Locate and edit factual knowledge (knowledge neurons) in pretrained transformers.",
    )
    parser.add_argument("--version", action="version", version=f"kn-edit {__version__}")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def _quiet_libraries() -> None:
    # transformers' own progress bars and advice would drown the tables.
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except ImportError:
        pass


def main(argv: Sequence[str] | None = None) -> int:
    from ..errors import KnEditError
    from .ui import console_err

    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    _quiet_libraries()
    try:
        return int(args.func(args) or 0)
    except KnEditError as exc:
        if args.debug:
            raise
        console_err().print(f"[bold red]error:[/] {exc}", highlight=False)
        return 2
    except KeyboardInterrupt:
        console_err().print("[bold red]interrupted[/]")
        return 130


if __name__ == "__main__":
    sys.exit(main())
