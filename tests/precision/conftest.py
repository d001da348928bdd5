"""Fixtures of the precision tests: the fragile model (host_int8 lives in tests/conftest.py)."""

from __future__ import annotations

import pytest
import torch

from tests.precision.models import fragile_model


@pytest.fixture(scope="session")
def fragile():
    return fragile_model()


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    # the tiny models here run fastest on one thread (the machine is shared); restored after each module
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
