"""Fixtures of the precision tests: the fragile model (host_int8 lives in tests/conftest.py)."""

from __future__ import annotations

import pytest

from tests.precision.models import fragile_model


@pytest.fixture(scope="session")
def fragile():
    return fragile_model()


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread(one_torch_thread):
    """Every precision test module runs its tiny torch models on one thread (``one_torch_thread``)."""
