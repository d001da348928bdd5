"""The arm-a78 int8 (w8a8) build runs its attention matmuls (QK^T, PV) on the batched int8 kernel's ``sdot``
and computes, under qemu, what the host int8 build computes (issue #14 items 1 and 7)."""

from __future__ import annotations

import re

import numpy as np
import pytest

from edgediff.kernels.int8_attention import ATTENTION_KERNEL
from tests.cross.arm64_int8 import functions, int8_builds, run_under_qemu
from tests.precision.helpers import plan_of, rewrite_counts
from tests.precision.models import fragile_model
from tests.precision.ties import assert_matches_measurement

pytestmark = pytest.mark.slow


def test_arm_a78_int8_attention_uses_sdot_and_matches_the_host_build(
    arm64, host_int8, one_torch_thread, tmp_path
):
    model, inputs, names = fragile_model()  # 2 heads, 64 queries and keys, head dim 8
    artifacts = int8_builds(model, inputs, names, host_int8, tmp_path)
    arm = artifacts["arm-a78"]
    rewritten = rewrite_counts(arm)
    assert rewritten["attention matmul int8 kernel (neon sdot)"] == 2
    kernels: dict[str, str] = {}  # kernel -> its code, with TVM's parallel-body lambdas (name_compute_...)
    for name, code in functions(arm).items():
        if name.startswith(ATTENTION_KERNEL):
            base = name.split("_compute_")[0]
            kernels[base] = kernels.get(base, "") + code
    assert len(kernels) == 2, sorted(kernels)  # the QK^T and the PV shape
    for name, code in kernels.items():
        assert re.search(r"\bsdot\s+v\d+\.4s, v\d+\.16b, v\d+\.16b", code), name

    got = run_under_qemu(arm64, arm, inputs, tmp_path)
    host = artifacts["host"].load()(*inputs)
    plan = plan_of(arm)
    # both equal the torch fake-quant measurement up to float32 order and the ties that order may flip
    assert_matches_measurement(got, model, inputs, plan, 1e-4)
    assert_matches_measurement(host, model, inputs, plan, 1e-4)
    print(
        f"arm-a78 int8 attention under qemu vs host int8: max abs diff {float(np.abs(got - host).max()):.2e}"
    )
