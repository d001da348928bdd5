"""``edgediff bundle``: artifacts + the torch-free runtime + run.py in one tar, and nothing of the compiler.

The bundle running on an (emulated) aarch64 device is tested in tests/cross/test_arm_emulation.py; here it
runs on the host.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest

import edgediff
from edgediff.errors import ArtifactError, EdgediffError
from edgediff.tools.bundle import make_bundle, runtime_files
from tests.cli.test_cli import assert_one_line_error, run_cli

# the runtime package and errors.py alone: the bundle is what the runtime imports, nothing of the compiler
ALLOWED_FILES = {
    "run.py",
    "README.md",
    "edgediff/__init__.py",
    "edgediff/errors.py",
}


def unpack(bundle: Path, destination: Path) -> Path:
    with tarfile.open(bundle) as tar:
        tar.extractall(destination, filter="data")
    return destination / bundle.name.removesuffix(".tar.gz").removesuffix(".tar")


def run_py(bundle_dir: Path, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(bundle_dir / "run.py"), *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=300,
    )


@pytest.mark.parametrize("suffix", [".tar", ".tar.gz"])
def test_bundle_holds_the_runtime_and_the_artifacts_only(compiled, tmp_path, suffix):
    artifact = compiled("tiny-vae-decoder", "host")
    result = run_cli("bundle", str(artifact.path), "-o", str(tmp_path / f"dev{suffix}"))
    assert result.returncode == 0, result.stderr
    with tarfile.open(tmp_path / f"dev{suffix}") as tar:
        members = {m.name.removeprefix("dev/"): m for m in tar.getmembers() if m.isfile()}
    artifact_prefix = f"artifacts/{artifact.path.name}/"
    stray = [
        name
        for name in members
        if name not in ALLOWED_FILES
        and not name.startswith(("edgediff/runtime/", artifact_prefix))
        or "__pycache__" in name
    ]
    assert stray == []
    assert {arcname for _, arcname in runtime_files()} <= set(members)
    assert {f"{artifact_prefix}{f}" for f in ("manifest.json", "model.so", "weights.bin")} <= set(members)
    assert members["run.py"].mode & 0o111

    bundle_dir = unpack(tmp_path / f"dev{suffix}", tmp_path / "device")
    init = (bundle_dir / "edgediff" / "__init__.py").read_text()
    assert "edgediff.api" not in init and "compile_model" not in init and edgediff.__version__ in init
    readme = (bundle_dir / "README.md").read_text()
    tvm_version = artifact.manifest["versions"]["tvm"]
    for fragment in (f"apache-tvm=={tvm_version}", "numpy", "python3", "run.py generate", artifact.path.name):
        assert fragment in readme


def test_bundled_run_py_runs_an_artifact_on_npy_inputs(compiled, tmp_path):
    artifact = compiled("tiny-vae-decoder", "host")
    bundle_dir = unpack(make_bundle([artifact.path], tmp_path / "dev.tar"), tmp_path / "device")
    latents = np.random.default_rng(0).standard_normal(artifact.inputs[0].shape).astype(np.float32)
    np.save(tmp_path / "latents.npy", latents)

    # the artifact by its bundled name, from another working directory
    result = run_py(
        bundle_dir, "run", artifact.path.name, "latents.npy", "-o", "out", "--repeat", "2", cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr
    assert "2 runs, median" in result.stdout
    (output,) = artifact.outputs
    got = np.load(tmp_path / "out" / f"{output.name}.npy")
    np.testing.assert_array_equal(got, edgediff.load(artifact.path)(latents))

    listed = run_py(bundle_dir, "list", cwd=tmp_path)
    assert listed.returncode == 0, listed.stderr
    assert artifact.path.name in listed.stdout and "runs here yes" in listed.stdout

    # the LoRA merge re-quantizes with the runtime's own quantizer: the bundle's copy imports on its own
    code = (
        "import sys; sys.path.insert(0, sys.argv[1]); "
        "import edgediff.runtime.quantize as q, edgediff.runtime.lora; print(q.__file__)"
    )
    imported = subprocess.run([sys.executable, "-c", code, str(bundle_dir)], capture_output=True, text=True)
    assert imported.returncode == 0, imported.stderr
    assert imported.stdout.strip().startswith(str(bundle_dir))

    missing = run_py(bundle_dir, "run", "nope", "latents.npy", cwd=tmp_path)
    assert missing.returncode == 1 and "Traceback" not in missing.stderr
    assert missing.stderr.strip() == (
        f"run.py: error: no artifact 'nope' here or in {bundle_dir / 'artifacts'} "
        f"(bundled: {artifact.path.name})"
    )
    wrong_inputs = run_py(bundle_dir, "run", artifact.path.name, cwd=tmp_path)
    assert wrong_inputs.returncode == 1 and "got 0 inputs, expected 1" in wrong_inputs.stderr


def test_bundle_refuses_what_a_device_cannot_run(compiled, tmp_path):
    # OpenCL kernels need a GPU runtime; the bundled runtime drives the CPU
    adreno = compiled("tiny-vae-decoder", "adreno-740")
    with pytest.raises(ArtifactError, match="adreno-740 .gpu. needs a device runtime"):
        make_bundle([adreno.path], tmp_path / "gpu.tar")

    # a library left as object files (no cross compiler at compile time) cannot be loaded anywhere
    objects = shutil.copytree(compiled("tiny-vae-decoder", "host").path, tmp_path / "objects")
    manifest = json.loads((objects / "manifest.json").read_text())
    manifest["library"]["format"] = "objects"
    (objects / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match="object files"):
        make_bundle([objects], tmp_path / "objects.tar")

    host = compiled("tiny-vae-decoder", "host").path
    with pytest.raises(EdgediffError, match="two artifacts named"):
        make_bundle([host, host], tmp_path / "twice.tar")
    with pytest.raises(EdgediffError, match="must end in .tar.gz, .tgz, .tar"):
        make_bundle([host], tmp_path / "dev.zip")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["objects"]  # nothing written, no partial files

    (tmp_path / "empty").mkdir()
    result = run_cli("bundle", str(tmp_path / "empty"), "-o", str(tmp_path / "x.tar"))
    assert_one_line_error(result, "empty' holds no manifest.json")
