from __future__ import annotations

from pathlib import Path

import pytest

from tiny_models import FAMILIES, build_model

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(params=FAMILIES)
def tiny(request):
    """A KnModel around a tiny random model of each supported family."""
    import kn_edit

    model, tok = build_model(request.param)
    return kn_edit.wrap(model, tok, name=f"tiny-{request.param}")


@pytest.fixture
def tiny_factory():
    import kn_edit

    def make(family: str, seed: int = 0, n_layers: int = 2):
        model, tok = build_model(family, seed=seed, n_layers=n_layers)
        return kn_edit.wrap(model, tok, name=f"tiny-{family}")

    return make


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
