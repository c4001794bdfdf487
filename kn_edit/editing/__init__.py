"""Editing methods behind one interface: every editor turns EditRequests into a revertible Edit."""

from .base import Edit, Editor, EditRequest, ParamPatch

__all__ = ["Edit", "EditRequest", "Editor", "ParamPatch"]
