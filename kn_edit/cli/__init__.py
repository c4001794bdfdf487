"""The ``kn-edit`` command line. Each command lives in its own module with ``register(subparsers)``;
the module sets ``func`` on its parser. rich is used only in this layer."""

from __future__ import annotations

import argparse
import importlib
import os
import signal
import sys
import threading
from contextlib import contextmanager
from typing import Iterator, Sequence

# Command modules, in the order `kn-edit --help` lists them.
COMMAND_MODULES = (
    "kn_edit.cli.edit",  # update-fact first: the toolkit's main job
    "kn_edit.cli.locate",
    "kn_edit.cli.subject",
    "kn_edit.cli.analyze",
    "kn_edit.cli.evaluate",
    "kn_edit.cli.layers",
    "kn_edit.cli.predict",
    "kn_edit.cli.benchmarks",
)


def build_parser() -> argparse.ArgumentParser:
    from .. import __version__

    parser = argparse.ArgumentParser(
        prog="kn-edit",
        description="Locate and edit factual knowledge (knowledge neurons) in pretrained transformers.",
    )
    parser.add_argument("--version", action="version", version=f"kn-edit {__version__}")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks")
    parser.add_argument("--max-tokens", type=int, default=None, metavar="N",
                        help="accept prompts and targets of up to N tokens (default 512)")
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


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised like Ctrl-C so that every ``finally`` (temporary save folders) runs on the way out."""


@contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """Within the block, SIGTERM raises Terminated (once: a second one during the clean-up is ignored)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        raise Terminated()

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextmanager
def _token_limit(n: int | None) -> Iterator[None]:
    if n is None:
        yield
        return
    from ..models.prompts import token_limit

    with token_limit(n):
        yield


def main(argv: Sequence[str] | None = None) -> int:
    from rich.markup import escape

    from ..errors import KnEditError
    from .ui import console_err

    def error(exc: KnEditError) -> int:
        # soft_wrap: the message stays one line (for logs and scripts), however narrow the terminal
        console_err().print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False, soft_wrap=True)
        return 2

    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except KnEditError as exc:  # an option's own check (ui.FiniteFloat)
        return error(exc)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    _quiet_libraries()
    try:
        with _sigterm_as_interrupt(), _token_limit(args.max_tokens):
            return int(args.func(args) or 0)
    except KnEditError as exc:
        if args.debug:
            raise
        return error(exc)
    except Terminated:
        console_err().print("[bold red]terminated[/] (SIGTERM): stopped; nothing partial was left behind")
        return 143
    except KeyboardInterrupt:
        console_err().print("[bold red]interrupted[/]: stopped; nothing partial was left behind")
        return 130


if __name__ == "__main__":
    sys.exit(main())
