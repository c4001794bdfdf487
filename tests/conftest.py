from __future__ import annotations

import os
from pathlib import Path

if os.environ.get("PYTEST_XDIST_WORKER"):
    # pytest runs one worker process per core (pyproject's addopts): torch's own threads on top oversubscribe the
    # cores (the suite took 4× as long on 2 cores). Set before torch starts; the tests' subprocesses inherit it.
    os.environ["OMP_NUM_THREADS"] = "1"

import pytest

from tiny_models import FAMILIES, tiny_km

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(params=FAMILIES)
def tiny(request):
    """A KnModel around a tiny random model of each supported family."""
    return tiny_km(request.param)


@pytest.fixture
def tiny_factory():
    """tiny_km: a KnModel around a tiny random model of a family (seed, layers)."""
    return tiny_km


@pytest.fixture
def tiny_load(monkeypatch, tiny_factory):
    """kn_edit.load replaced: any model name loads one tiny LLaMA, which this returns."""
    import kn_edit

    km = tiny_factory("llama")
    monkeypatch.setattr(kn_edit, "load", lambda name, device="auto", reporter=None, adapter=None: km)
    return km


@pytest.fixture(scope="session")
def smollm2():
    """The real smollm2-135m (provisioned into the cache on first use). Shared: tests must leave it unchanged."""
    import kn_edit

    return kn_edit.load("smollm2-135m", device="cpu")


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared data not found at {SHARED_DATA}")
    return SHARED_DATA
