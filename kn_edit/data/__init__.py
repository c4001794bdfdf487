"""Fact data sets (ParaRel, Known 1000, user JSONL) read into FactRecords, edit requests, plain text, and the field's
benchmark files (CounterFact, zsRE, MQuAKE, KnowEdit) read into BenchmarkCases."""

from .benchmarks import (
    BENCHMARK_SOURCES, CaseList, build_counterfact, build_two_hop, load_benchmark, read_counterfact, read_knowedit,
    read_mquake, read_zsre, write_benchmark,
)  # fmt: skip
from .jsonl import load_jsonl_facts, read_jsonl
from .known1000 import load_known1000
from .pararel import download_pararel, load_pararel
from .records import BenchmarkCase, FactRecord, FactSet, Probe, SkippedFact
from .requests import choose_new_object, edit_request, expressible, known_mask, relation_objects, unusable_reason
from .text import text_file_passages, wiki_key_passages, wiki_passages

__all__ = [
    "BENCHMARK_SOURCES", "BenchmarkCase", "CaseList", "Probe", "build_counterfact", "build_two_hop", "load_benchmark",
    "read_counterfact", "read_knowedit", "read_mquake", "read_zsre", "write_benchmark",
    "FactRecord", "FactSet", "SkippedFact", "choose_new_object", "download_pararel", "edit_request", "expressible",
    "known_mask", "load_jsonl_facts", "load_known1000", "load_pararel", "read_jsonl", "relation_objects",
    "text_file_passages", "unusable_reason", "wiki_key_passages", "wiki_passages",
]  # fmt: skip
