"""The runtime is torch-free: it imports only numpy, the TVM runtime and the standard library, and it decides
where an artifact runs when it is loaded (so a cross-compiled artifact loads on its device)."""

from __future__ import annotations

import json
import platform
import subprocess
import sys

import numpy as np
import pytest

import edgediff
from edgediff.runtime.artifact import runs_here, target_arch

RUNTIME_MODULES = (
    "edgediff.runtime",
    "edgediff.runtime.artifact",
    "edgediff.runtime.samplers",
    "edgediff.runtime.pipeline",
    "edgediff.runtime.image",
    "edgediff.runtime.run",
)
# What a device does not have: the ML frameworks, and the compiler half of edgediff (which needs them).
FOREIGN = (
    "torch",
    "diffusers",
    "transformers",
    "tqdm",
    "edgediff.api",
    "edgediff.frontend",
    "edgediff.backend",
    "edgediff.passes",
    "edgediff.zoo",
)

# Makes the modules a device lacks unimportable, as on the device (torch is installed here).
BLOCK_FOREIGN = """
import sys

class _Absent:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("torch", "diffusers", "transformers"):
            raise ModuleNotFoundError(f"No module named {name!r} (blocked: the device has none)")
        return None

sys.meta_path.insert(0, _Absent())
"""


def _python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)


def test_importing_the_runtime_pulls_no_torch():
    code = (
        "import importlib, json, sys\n"
        f"for name in {RUNTIME_MODULES!r}:\n"
        "    importlib.import_module(name)\n"
        f"print(json.dumps(sorted(m for m in {FOREIGN!r} if m in sys.modules)))\n"
    )
    result = _python(code)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == []


def test_runtime_runs_an_artifact_where_torch_cannot_be_imported(compiled, tmp_path):
    artifact = compiled("tiny-vae-decoder", "host")
    latents = np.random.default_rng(0).standard_normal(artifact.inputs[0].shape).astype(np.float32)
    np.save(tmp_path / "latents.npy", latents)
    code = BLOCK_FOREIGN + (
        "import json\n"
        "import numpy as np\n"
        "from edgediff.runtime.artifact import load\n"
        f"out = load({str(artifact.path)!r})(np.load({str(tmp_path / 'latents.npy')!r}))\n"
        f"np.save({str(tmp_path / 'out.npy')!r}, out)\n"
        f"print(json.dumps(sorted(m for m in {FOREIGN!r} if m in sys.modules)))\n"
    )
    result = _python(code)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout.splitlines()[-1]) == []
    np.testing.assert_array_equal(np.load(tmp_path / "out.npy"), edgediff.load(artifact.path)(latents))


def _manifest(target: dict | str, runs_on_host: bool) -> dict:
    return {"target": {"tvm": {"target": target}}, "runs_on_host": runs_on_host}


@pytest.mark.parametrize(
    ("machine", "target", "flag", "expected"),
    [
        # a cross build is refused on the x86 machine that compiled it, and runs on its device
        ("x86_64", {"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mcpu": "cortex-a78"}, False, False),
        ("aarch64", {"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mcpu": "cortex-a78"}, False, True),
        ("arm64", {"kind": "llvm", "mtriple": "aarch64-linux-gnu"}, False, True),
        ("AMD64", {"kind": "llvm", "mtriple": "x86_64-pc-linux-gnu"}, False, True),
        # no triple (the host target): built for the compiling machine, the compile-time answer stands
        ("aarch64", {"kind": "llvm", "mcpu": "znver4"}, True, True),
        ("x86_64", {"kind": "llvm"}, False, False),
        # GPU code needs a device runtime the CPU runtime does not drive
        ("aarch64", {"kind": "opencl", "device": "adreno"}, False, False),
        ("aarch64", "qcom/adreno-opencl", False, False),
    ],
)
def test_runs_here_is_decided_by_the_loading_machine(monkeypatch, machine, target, flag, expected):
    monkeypatch.setattr(platform, "machine", lambda: machine)
    assert runs_here(_manifest(target, flag)) is expected


def test_cross_build_names_its_arch_when_refused(compiled):
    artifact = compiled("tiny-vae-decoder", "arm-a78")
    assert target_arch(artifact.manifest) == "aarch64"
    with pytest.raises(edgediff.EdgediffError, match=r"\(aarch64\), which does not run on this machine"):
        artifact.load()
