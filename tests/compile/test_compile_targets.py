"""Each tiny zoo model compiles for every built-in target; host builds match PyTorch."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import edgediff
from tests.conftest import AARCH64, TINY_MODELS, elf_machine


@pytest.mark.parametrize("name", TINY_MODELS)
def test_host_build_matches_torch(name, compiled, zoo_model):
    artifact = compiled(name, "host")
    module = edgediff.load(artifact.path)
    zm = zoo_model(name)
    with torch.no_grad():
        expected = zm.module(*zm.example_inputs).numpy()
    got = module(*zm.example_inputs)
    err = float(np.abs(got - expected).max())
    scale = float(np.abs(expected).max())
    print(f"{name}: max abs error {err:.2e} (output max {scale:.2e})")
    assert got.shape == expected.shape
    assert err <= 1e-4 * max(1.0, scale)


@pytest.mark.slow
@pytest.mark.parametrize("name", TINY_MODELS)
def test_arm_a78_cross_build_is_aarch64(name, compiled):
    artifact = compiled(name, "arm-a78")
    library = artifact.manifest["library"]
    assert library["format"] == "shared", artifact.manifest["notes"]
    assert elf_machine(artifact.library_path) == AARCH64
    assert not artifact.runs_on_host
    with pytest.raises(edgediff.EdgediffError, match="does not run on this machine"):
        artifact.load()


@pytest.mark.slow
@pytest.mark.parametrize("name", ["tiny-sd15-unet", "tiny-dit", "tiny-vae-decoder"])
def test_adreno_build_has_opencl_kernels(name, compiled):
    artifact = compiled(name, "adreno-740")
    device_code = artifact.manifest["device_code"]["opencl"]
    source = (artifact.path / device_code["file"]).read_text()
    assert device_code["kernels"] > 5
    assert source.count("__kernel void") >= device_code["kernels"]
    # Every kernel needs thread bindings on a GPU: the schedule pass must have covered all of them.
    schedule = next(p for p in artifact.manifest["passes"] if p["name"] == "schedule")["report"]
    assert schedule["scheduled"] == schedule["kernels"] > 0
    assert elf_machine(artifact.library_path) == AARCH64


@pytest.mark.slow
def test_ane_like_build_is_fp16_and_reports_npu_coverage(compiled):
    artifact = compiled("tiny-sd15-unet", "ane-like")
    passes = {p["name"]: p["report"] for p in artifact.manifest["passes"]}
    assert passes["cast-to-fp16"]["casts_added"] > 0
    coverage = passes["npu-op-coverage"]
    assert coverage["npu_ops"].get("relax.nn.conv2d", 0) > 0
    assert any("npu_program.json" in note for note in artifact.manifest["notes"])
    npu = artifact.manifest["npu"]
    assert (artifact.path / npu["program"]).is_file() and (artifact.path / npu["plot"]).is_file()
    assert 0 < npu["total"]["sram_peak"] <= npu["sram_bytes"]
    assert elf_machine(artifact.library_path) == AARCH64


def test_manifest_records_weights_apart_from_library(compiled, zoo_model):
    artifact = compiled("tiny-sd15-unet", "host")
    manifest = artifact.manifest
    zm = zoo_model("tiny-sd15-unet")
    state = zm.module.state_dict()
    n_params = sum(t.numel() * t.element_size() for t in state.values())
    assert manifest["weights"]["bytes"] >= n_params
    names = {t["name"] for t in manifest["weights"]["tensors"]}
    # weight names are the wrapper's state-dict names (a weight precomputed at compile time adds the kernel
    # that made it: "proj.weight:transpose"), so checkpoints and LoRA files can be matched
    assert {name.split(":")[0] for name in names} <= set(state)
    assert any(name.endswith(":transpose") for name in names)
    assert [i["name"] for i in manifest["inputs"]] == list(zm.input_names)
    assert manifest["versions"]["tvm"]
    assert manifest["library"]["sha256"] and manifest["weights"]["sha256"]
    # the library holds code only: it must be much smaller than it would be with weights baked in
    assert artifact.library_path.stat().st_size < 20 * 1024 * 1024
