"""Progress reporting without tying the library to a terminal: library code reports to a ``Reporter``;
the default one draws rich progress bars on stderr, ``NullReporter`` stays silent (tests, servers)."""

from __future__ import annotations

import os
from contextlib import contextmanager
from typing import Iterable, Iterator, Protocol, TypeVar

T = TypeVar("T")


class Task(Protocol):
    def advance(self, amount: float = 1.0) -> None: ...


class Reporter(Protocol):
    def task(self, description: str, total: float | None = None): ...


class _NullTask:
    def advance(self, amount: float = 1.0) -> None:
        pass


class NullReporter:
    @contextmanager
    def task(self, description: str, total: float | None = None) -> Iterator[_NullTask]:
        yield _NullTask()


class RichReporter:
    """rich progress bars on stderr; one live display per task."""

    @contextmanager
    def task(self, description: str, total: float | None = None) -> Iterator[Task]:
        from rich.console import Console
        from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

        columns = [SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), TimeElapsedColumn()]
        with Progress(*columns, console=Console(stderr=True), transient=False) as progress:
            task_id = progress.add_task(description, total=total)

            class _Task:
                def advance(self, amount: float = 1.0) -> None:
                    progress.advance(task_id, amount)

            yield _Task()
            if total is None:
                progress.update(task_id, total=1, completed=1)


def track(reporter: Reporter, items: Iterable[T], description: str, total: float | None = None) -> Iterator[T]:
    """``items``, advancing a task of ``reporter`` by one per item, so that long work shows progress even when
    it is one request or one prompt. Leaving the loop early (break, return, an error) ends the task."""
    if total is None and hasattr(items, "__len__"):
        total = len(items)  # type: ignore[arg-type]
    with reporter.task(description, total=total) as task:
        for item in items:
            try:
                yield item
            finally:  # also when the loop is left during this item: its work was done
                task.advance()


def default_reporter(quiet: bool = False) -> Reporter:
    """Rich progress bars; none when ``quiet`` or in a process a distributed launcher started for another rank
    (Lightning's DDP sets LOCAL_RANK / NODE_RANK there): process 0's bars are the run's."""
    other_rank = any(os.environ.get(name, "0") not in ("", "0") for name in ("LOCAL_RANK", "NODE_RANK"))
    return NullReporter() if quiet or other_rank else RichReporter()
