"""The arm-a78 int8 (w8a8) build runs its Linear layers and convs on ``sdot`` and computes, under qemu, what
the host int8 build computes: the torch fake-quant measurement of the same plan (issue #14 item 7)."""

from __future__ import annotations

import re
from typing import Any

import numpy as np
import pytest

from tests.cross.arm64_int8 import function, functions, int8_builds, run_under_qemu
from tests.precision.helpers import plan_of, rewrite_counts
from tests.precision.models import fragile_model
from tests.precision.ties import assert_matches_measurement

pytestmark = pytest.mark.slow


def test_arm_a78_int8_build_uses_sdot_and_matches_the_host_build(
    arm64, host_int8, one_torch_thread, tmp_path
):
    model, inputs, names = fragile_model()
    artifacts = int8_builds(model, inputs, names, host_int8, tmp_path)
    arm = artifacts["arm-a78"]
    rewritten = rewrite_counts(arm)
    assert rewritten["int8 kernel (neon sdot)"] == 5
    # the four 3x3 convs: quantize + im2col, then the same GEMM (conv_out's 4 channels padded to 8)
    assert rewritten["int8 kernel conv2d (neon sdot)"] == rewritten["conv2d w8a8"] == 4
    assert rewritten["int8 kernel conv2d bias fused"] == 4
    code = functions(arm)
    assert len(re.findall(r"\bsdot\b", "\n".join(code.values()))) >= 5
    # the GEMM of the convs' shape (64 output pixels x 3 * 3 * 16 -> 16 channels) is its own sdot kernel
    conv_gemm = function(code, "int8_matmul_64x144x16")
    assert re.search(r"\bsdot\b", conv_gemm), conv_gemm[:2000]
    assert function(code, "int8_im2col_64x144")
    plan = plan_of(arm)

    # the same formats and scales; each target its latency, and its bytes (a vpdpbusd host also stores the
    # int32 column sums of its uint8 activations)
    def quantization(p: Any) -> list[dict[str, Any]]:
        skip = ("latency_s", "bytes")
        return [{k: v for k, v in layer.items() if k not in skip} for layer in p.to_dict()["layers"]]

    assert quantization(plan) == quantization(plan_of(artifacts["host"]))

    got = run_under_qemu(arm64, arm, inputs, tmp_path)
    host = artifacts["host"].load()(*inputs)
    # both equal the measurement up to float32 order and the rounding ties that order may flip
    assert_matches_measurement(got, model, inputs, plan, 1e-4)
    assert_matches_measurement(host, model, inputs, plan, 1e-4)
    print(f"arm-a78 int8 under qemu vs host int8: max abs diff {float(np.abs(got - host).max()):.2e}")
