"""The field's benchmark files (CounterFact, zsRE, MQuAKE, KnowEdit) read into BenchmarkCases, and CounterFact- and
MQuAKE-style sets built offline from ParaRel.

``load_benchmark(source, path)`` is what ``data.source: counterfact | zsre | mquake | knowedit`` with ``data.path``
reads; each format's layout and how it maps onto EditRequest and Probe is in its reader's docstring.
"""

from __future__ import annotations

from pathlib import Path

from ...errors import ConfigError
from .build import build_counterfact, write_benchmark
from .counterfact import read_counterfact
from .fields import CaseList
from .knowedit import read_knowedit
from .mquake import read_mquake
from .two_hop import build_two_hop
from .zsre import read_zsre

READERS = {"counterfact": read_counterfact, "zsre": read_zsre, "mquake": read_mquake, "knowedit": read_knowedit}
BENCHMARK_SOURCES = tuple(READERS)


def load_benchmark(source: str, path: str | Path) -> CaseList:
    """The cases of the benchmark file at ``path`` in ``source``'s layout (a list of BenchmarkCase, with the
    records set aside in ``.skipped``)."""
    if source not in READERS:
        raise ConfigError(f"unknown benchmark source {source!r}; one of {', '.join(BENCHMARK_SOURCES)}")
    return READERS[source](path)


__all__ = [
    "BENCHMARK_SOURCES", "CaseList", "build_counterfact", "build_two_hop", "load_benchmark", "read_counterfact",
    "read_knowedit", "read_mquake", "read_zsre", "write_benchmark",
]  # fmt: skip
