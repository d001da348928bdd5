"""Fixtures of the precision tests: an int8-capable host target and the fragile model's measurements."""

from __future__ import annotations

import pytest
import torch

from edgediff.targets import load_target
from edgediff.targets.spec import TargetSpec
from tests.precision.models import fragile_model


@pytest.fixture(scope="session")
def host_int8() -> TargetSpec:
    """This machine with int8 in its dtypes (x86 has VNNI / pmaddubsw): int8 artifacts that run here."""
    data = load_target("host").to_dict()
    data["name"] = "host-int8"
    data["dtypes"] = ["float32", "float16", "int8"]
    data["compute"]["peak_gflops"]["int8"] = 300
    return TargetSpec.from_dict(data)


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
