"""Fact data sets (ParaRel, Known 1000, user JSONL) read into FactRecords, edit requests, and plain text."""

from .jsonl import load_jsonl_facts, read_jsonl
from .known1000 import load_known1000
from .pararel import download_pararel, load_pararel
from .records import FactRecord, FactSet, SkippedFact
from .requests import choose_new_object, edit_request, expressible, known_mask, relation_objects, unusable_reason
from .text import text_file_passages, wiki_key_passages, wiki_passages

__all__ = [
    "FactRecord", "FactSet", "SkippedFact", "choose_new_object", "download_pararel", "edit_request", "expressible",
    "known_mask", "load_jsonl_facts", "load_known1000", "load_pararel", "read_jsonl", "relation_objects",
    "text_file_passages", "unusable_reason", "wiki_key_passages", "wiki_passages",
]  # fmt: skip
