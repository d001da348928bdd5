"""The arm-a78 int8 (w8a8) build runs its Linear layers and convs on ``sdot`` and computes, under qemu, what
the host int8 build computes: the torch fake-quant measurement of the same plan (issue #14 item 7)."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import edgediff
from tests.precision.models import fragile_model
from tests.precision.test_compile import plan_of
from tests.precision.ties import assert_matches_measurement

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
RUN_JOB = """
import json, sys
import numpy as np
from edgediff.runtime.artifact import load

job = json.load(open(sys.argv[1]))
np.save(job["output"], load(job["artifact"])(*[np.load(path) for path in job["inputs"]]))
print("ran")
"""


def _disassembly(library: Path) -> str:
    result = subprocess.run(
        ["aarch64-linux-gnu-objdump", "-d", str(library)], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def _function(disassembly: str, prefix: str) -> str:
    """The disassembly of the function whose symbol starts with ``prefix`` (through the next symbol)."""
    match = re.search(
        rf"^[0-9a-f]+ <{re.escape(prefix)}[^>]*>:\n(.*?)(?=^[0-9a-f]+ <|\Z)", disassembly, re.M | re.S
    )
    assert match, f"no function {prefix}* in the library"
    return match.group(1)


def test_arm_a78_int8_build_uses_sdot_and_matches_the_host_build(
    arm64, host_int8, one_torch_thread, tmp_path
):
    model, inputs, names = fragile_model()
    artifacts = {
        target: edgediff.compile_model(
            model,
            inputs,
            target=spec,
            input_names=names,
            output_dir=tmp_path / target,
            progress=False,
            precision="int8",
        )
        for target, spec in (("host", host_int8), ("arm-a78", "arm-a78"))
    }
    arm = artifacts["arm-a78"]
    rewritten = {p["name"]: p["report"] for p in arm.manifest["passes"]}["mixed-precision"]["rewritten"]
    assert rewritten["int8 kernel (neon sdot)"] == 5
    # the four 3x3 convs: quantize + im2col, then the same GEMM (conv_out's 4 channels padded to 8)
    assert rewritten["int8 kernel conv2d (neon sdot)"] == rewritten["conv2d w8a8"] == 4
    assert rewritten["int8 kernel conv2d bias fused"] == 4
    (library,) = sorted(arm.path.glob("*.so"))
    disassembly = _disassembly(library)
    assert len(re.findall(r"\bsdot\b", disassembly)) >= 5
    # the GEMM of the convs' shape (64 output pixels x 3 * 3 * 16 -> 16 channels) is its own sdot kernel
    conv_gemm = _function(disassembly, "int8_matmul_64x144x16")
    assert re.search(r"\bsdot\b", conv_gemm), conv_gemm[:2000]
    assert _function(disassembly, "int8_im2col_64x144")
    plan = plan_of(arm)

    def quantization(p: Any) -> list[dict[str, Any]]:  # the same formats and scales; each target its latency
        return [{k: v for k, v in layer.items() if k != "latency_s"} for layer in p.to_dict()["layers"]]

    assert quantization(plan) == quantization(plan_of(artifacts["host"]))

    paths = []
    for i, tensor in enumerate(inputs):
        paths.append(str(tmp_path / f"in{i}.npy"))
        np.save(paths[-1], tensor.numpy())
    job = {"artifact": str(arm.path), "inputs": paths, "output": str(tmp_path / "arm.npy")}
    (tmp_path / "job.json").write_text(json.dumps(job))
    result = arm64.run(["-c", RUN_JOB, str(tmp_path / "job.json")], pythonpath=[REPO], timeout=900)
    assert result.returncode == 0, f"{result.stdout}\n{result.stderr[-3000:]}"
    got = np.load(tmp_path / "arm.npy")
    host = artifacts["host"].load()(*inputs)
    # both equal the measurement up to float32 order and the rounding ties that order may flip
    assert_matches_measurement(got, model, inputs, plan, 1e-4)
    assert_matches_measurement(host, model, inputs, plan, 1e-4)
    print(f"arm-a78 int8 under qemu vs host int8: max abs diff {float(np.abs(got - host).max()):.2e}")
