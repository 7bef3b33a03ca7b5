import pytest
import torch


@pytest.fixture(autouse=True)
def _seeded():
    """Every test starts from the same RNG state."""
    torch.manual_seed(0)
    yield


@pytest.fixture
def use_backend(monkeypatch):
    """Force a backend through KAT_RATIONAL_BACKEND for the duration of one test."""

    def _use(name: str) -> None:
        monkeypatch.setenv("KAT_RATIONAL_BACKEND", name)

    return _use
