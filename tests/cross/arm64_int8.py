"""Helpers of the arm-a78 int8 tests (test_int8_arm.py, test_int8_attention_arm.py): the host and arm-a78
int8 builds of one model, the disassembly of the arm build's functions, and a call of it under qemu."""

from __future__ import annotations

import json
import re
import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

import edgediff
from tests.precision.helpers import INT8_A8, compile_at

REPO = Path(__file__).resolve().parents[2]
OBJDUMP = "aarch64-linux-gnu-objdump"  # binutils-aarch64-linux-gnu, installed by `make device-tools`
# run in the arm64 root's python (numpy, no torch): the artifact on the saved inputs, its output saved
RUN_JOB = """
import json, sys
import numpy as np
from edgediff.runtime.artifact import load

job = json.load(open(sys.argv[1]))
np.save(job["output"], load(job["artifact"])(*[np.load(path) for path in job["inputs"]]))
print("ran")
"""


def int8_builds(
    model: Any, inputs: Sequence[Any], names: Sequence[str], host_int8: Any, root: Path
) -> dict[str, edgediff.Artifact]:
    """``model`` at ``--precision int8``, attention matmuls included (``INT8_A8``), for this host
    (``host_int8``) and for arm-a78, under ``root``."""
    return {
        target: compile_at(model, inputs, names, spec, root / target, INT8_A8)
        for target, spec in (("host", host_int8), ("arm-a78", "arm-a78"))
    }


def functions(artifact: edgediff.Artifact) -> dict[str, str]:
    """Disassembly of each function symbol of an aarch64 artifact's library, in address order: name -> its
    instructions (through the next symbol)."""
    (library,) = sorted(artifact.path.glob("*.so"))
    result = subprocess.run([OBJDUMP, "-d", str(library)], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr
    found: dict[str, str] = {}
    for block in re.split(r"\n(?=[0-9a-f]+ <)", result.stdout):
        header = re.match(r"[0-9a-f]+ <([^>]+)>:\n?", block)
        if header:
            found[header.group(1)] = block[header.end() :]
    return found


def function(library_functions: dict[str, str], prefix: str) -> str:
    """The instructions of the first function whose symbol starts with ``prefix``."""
    code = next((code for name, code in library_functions.items() if name.startswith(prefix)), None)
    assert code is not None, f"no function {prefix}* in the library"
    return code


def run_under_qemu(
    arm64: Any, artifact: edgediff.Artifact, inputs: Sequence[Any], workdir: Path
) -> np.ndarray:
    """``artifact`` (an arm64 build) called on ``inputs`` (torch tensors) in the emulated arm64 root."""
    paths = []
    for i, tensor in enumerate(inputs):
        paths.append(str(workdir / f"in{i}.npy"))
        np.save(paths[-1], tensor.numpy())
    job = {"artifact": str(artifact.path), "inputs": paths, "output": str(workdir / "arm.npy")}
    (workdir / "job.json").write_text(json.dumps(job))
    result = arm64.run(["-c", RUN_JOB, str(workdir / "job.json")], pythonpath=[REPO], timeout=900)
    assert result.returncode == 0, f"{result.stdout}\n{result.stderr[-3000:]}"
    return np.load(workdir / "arm.npy")
