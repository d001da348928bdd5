"""The arm-a78 ``fp16-acc16`` build computes in float16 on the vector unit: its disassembly has fp16
``fmla`` on ``.8h``/``.4h`` vectors (the ``fp16`` build widens to float32 instead), and under qemu it matches
the host build of the same plan within float16 tolerance."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

import edgediff
from tests.precision.models import fragile_model

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
OBJDUMP = "aarch64-linux-gnu-objdump"  # binutils-aarch64-linux-gnu, installed by `make device-tools`

RUN = """
import sys
import numpy as np
from edgediff.runtime.artifact import load

module = load(sys.argv[1])
np.save(sys.argv[-1], module(*[np.load(p) for p in sys.argv[2:-1]]))
print("ran")
"""


def _vector_fmla(library: Path) -> dict[str, int]:
    """Count of fmla instructions by arrangement (8h, 4h, 4s, 2d) in a library's disassembly."""
    text = subprocess.run([OBJDUMP, "-d", str(library)], capture_output=True, text=True, check=True).stdout
    counts: dict[str, int] = {}
    for arrangement in re.findall(r"\bfmla\s+v\d+\.(\d+[hsd]),", text):
        counts[arrangement] = counts.get(arrangement, 0) + 1
    return counts


def test_fp16_acc16_arm_build_uses_fp16_fmla_and_matches_host(arm64, tmp_path):
    torch.set_num_threads(1)
    model, inputs, names = fragile_model()

    def build(target: str, precision: str) -> edgediff.Artifact:
        return edgediff.compile_model(
            model,
            inputs,
            target=target,
            input_names=names,
            output_dir=tmp_path / f"{target}-{precision}",
            progress=False,
            precision=precision,
            require_cross_compiler=target != "host",
        )

    arm = build("arm-a78", "fp16-acc16")
    half = _vector_fmla(arm.path / arm.manifest["library"]["file"])
    assert half.get("8h", 0) + half.get("4h", 0) >= 8, half
    widened = build("arm-a78", "fp16")  # float32 accumulation: fp16 loads widened, float32 fmla
    wide = _vector_fmla(widened.path / widened.manifest["library"]["file"])
    assert wide.get("8h", 0) + wide.get("4h", 0) == 0 and wide.get("4s", 0) > 0, wide

    host = build("host", "fp16-acc16")
    paths = []
    for i, tensor in enumerate(inputs):
        paths.append(str(tmp_path / f"in{i}.npy"))
        np.save(paths[-1], tensor.numpy())
    out = tmp_path / "arm.npy"
    result = arm64.run(["-c", RUN, str(arm.path), *paths, str(out)], pythonpath=[REPO], timeout=900)
    assert result.returncode == 0, f"{result.stdout}\n{result.stderr[-2000:]}"
    got, want = np.load(out), host.load()(*inputs)
    with torch.no_grad():
        exact = model(*inputs).numpy()
    scale = float(np.abs(want).max())
    print(
        f"arm-a78 fp16-acc16 under qemu vs host build: {np.abs(got - want).max() / scale:.2e}, "
        f"vs float torch: {np.abs(got - exact).max() / scale:.2e}"
    )
    # the same float16 arithmetic, summed in a different order (and fused) on each side: measured 4.5e-3
    assert got.shape == want.shape
    assert float(np.abs(got - want).max()) / scale < 1e-2
    assert float(np.abs(got - exact).max()) / scale < 1e-2
