"""The arm-a78 int8 (w8a8) build runs its attention matmuls (QK^T, PV) on the batched int8 kernel's ``sdot``
and computes, under qemu, what the host int8 build computes (issue #14 items 1 and 7)."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import numpy as np
import pytest

import edgediff
from edgediff.kernels.int8_attention import ATTENTION_KERNEL
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


def _functions(library: Path) -> dict[str, str]:
    """Disassembly of each function symbol of an aarch64 shared library: name -> its instructions."""
    result = subprocess.run(
        ["aarch64-linux-gnu-objdump", "-d", str(library)], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr
    functions: dict[str, str] = {}
    for block in re.split(r"\n(?=[0-9a-f]+ <)", result.stdout):
        header = re.match(r"[0-9a-f]+ <([^>]+)>:", block)
        if header:
            functions[header.group(1)] = block
    return functions


def test_arm_a78_int8_attention_uses_sdot_and_matches_the_host_build(
    arm64, host_int8, one_torch_thread, tmp_path
):
    model, inputs, names = fragile_model()  # 2 heads, 64 queries and keys, head dim 8
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
    assert rewritten["attention matmul int8 kernel (neon sdot)"] == 2
    (library,) = sorted(arm.path.glob("*.so"))
    kernels: dict[str, str] = {}  # kernel -> its code, with TVM's parallel-body lambdas (name_compute_...)
    for name, code in _functions(library).items():
        if name.startswith(ATTENTION_KERNEL):
            base = name.split("_compute_")[0]
            kernels[base] = kernels.get(base, "") + code
    assert len(kernels) == 2, sorted(kernels)  # the QK^T and the PV shape
    for name, code in kernels.items():
        assert re.search(r"\bsdot\s+v\d+\.4s, v\d+\.16b, v\d+\.16b", code), name

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
    plan = plan_of(arm)
    # both equal the torch fake-quant measurement up to float32 order and the ties that order may flip
    assert_matches_measurement(got, model, inputs, plan, 1e-4)
    assert_matches_measurement(host, model, inputs, plan, 1e-4)
    print(
        f"arm-a78 int8 attention under qemu vs host int8: max abs diff {float(np.abs(got - host).max()):.2e}"
    )
