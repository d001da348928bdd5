"""pack-matmul-weights: Linear and GEGLU weights stored in register-tile column panels, same numbers as torch
with and without the pass, the panels scheduled by the Matmul / GegluMatmul rules, int8 weights packed as
int8, and builds for arm-a78 (NEON-width panels)."""

from __future__ import annotations

import numpy as np
import torch

import edgediff
from edgediff.runtime.artifact import load_weights
from edgediff.runtime.layouts import from_stored_layout, to_stored_layout
from tests.conftest import pinned_host
from tests.speed.test_fuse_norm_activation import Chains, _close, _inputs


def _report(artifact: edgediff.Artifact, name: str) -> dict:
    return next(p for p in artifact.manifest["passes"] if p["name"] == name)["report"]


def _stored(artifact: edgediff.Artifact) -> dict[str, list[int]]:
    return {t["name"].split(":")[0]: t["shape"] for t in artifact.manifest["weights"]["tensors"]}


def test_packed_weights_match_torch_and_are_stored_packed(tmp_path):
    torch.manual_seed(0)
    model, inputs = Chains().eval(), _inputs()
    with torch.no_grad():
        expected = model(*inputs).numpy()
    # panel widths follow the spec's vector width: pinned (AVX-512 widths), not read from this CPU
    spec = pinned_host()
    on = edgediff.compile_model(model, inputs, spec, output_dir=tmp_path / "on", progress=False)
    off = edgediff.compile_model(
        model,
        inputs,
        spec,
        output_dir=tmp_path / "off",
        passes={"pack-matmul-weights": False},
        progress=False,
    )
    report = _report(on, "pack-matmul-weights")
    # up (16 -> 40) and GEGLU (16 -> 2 x 24); down, out and ff have 16 columns: one 16-wide panel, left
    assert report["packed"] == {"matmul": 1, "geglu": 1}, report
    assert sum(report["left_row_major"].values()) == 3, report
    stored, plain = _stored(on), _stored(off)
    # 16 lanes; 40 and 24 columns take 8-wide vectors, one per tile row -> panels of 8
    assert stored["up.weight"] == [5, 16, 8] and plain["up.weight"] == [16, 40]
    assert stored["geglu.weight"] == [2, 3, 16, 8] and plain["geglu.weight"] == [16, 48]
    assert stored["down.weight"] == plain["down.weight"] == [40, 16]
    assert on.manifest["weights"]["bytes"] == off.manifest["weights"]["bytes"]
    for artifact in (on, off):
        schedule = _report(artifact, "schedule")
        assert schedule["scheduled"] == schedule["kernels"] and not schedule["rule_failures"], schedule
        assert schedule["kernels_by_rule"]["GegluMatmul"] == 1
    assert (
        _report(on, "schedule")["kernels_by_rule"]["Matmul"]
        == _report(off, "schedule")["kernels_by_rule"]["Matmul"]
    )
    _close(edgediff.load(on.path)(*inputs), expected)
    _close(edgediff.load(off.path)(*inputs), expected)
    # the manifest says how each packed tensor was made from the model's weight, exactly enough to redo it
    layouts = on.manifest["weights"]["layouts"]
    assert set(layouts) == {"up.weight", "geglu.weight"}
    assert layouts["geglu.weight"] == {"layout": "column_panels", "panel": 8, "groups": 2, "transposed": True}
    tensors = on.manifest["weights"]["tensors"]
    stored = dict(
        zip([t["name"].split(":")[0] for t in tensors], load_weights(on.path, on.manifest), strict=True)
    )
    for name, layout in layouts.items():
        weight = model.get_parameter(name).detach().numpy()
        np.testing.assert_array_equal(stored[name], to_stored_layout(weight, layout))
        np.testing.assert_array_equal(from_stored_layout(stored[name], layout, weight.shape), weight)


def test_zoo_unet_packs_every_linear(compiled, zoo_model):
    zm = zoo_model("tiny-sd15-unet")
    artifact = compiled("tiny-sd15-unet", "host")
    report = _report(artifact, "pack-matmul-weights")
    assert report["packed"]["geglu"] == 7 and report["packed"]["matmul"] > 0, report
    panels = [t for t in artifact.manifest["weights"]["tensors"] if len(t["shape"]) in (3, 4)]
    assert any("ff.net.0.proj.weight" in t["name"] for t in panels)
    with torch.no_grad():
        expected = zm.module(*zm.example_inputs).numpy()
    _close(edgediff.load(artifact.path)(*zm.example_inputs), expected)


def test_int8_weights_are_packed_as_int8(tmp_path, host_int8):
    torch.manual_seed(0)
    model, inputs = Chains().eval(), _inputs()
    on, off = (
        edgediff.compile_model(
            model,
            inputs,
            host_int8,
            output_dir=tmp_path / name,
            precision="w8",
            passes={"pack-matmul-weights": name == "on"},
            progress=False,
        )
        for name in ("on", "off")
    )
    stored = {t["name"].split(":")[0]: t for t in on.manifest["weights"]["tensors"]}
    assert stored["up.weight"]["dtype"] == "int8" and stored["up.weight"]["shape"] == [5, 16, 8]
    assert on.manifest["weights"]["bytes"] == off.manifest["weights"]["bytes"]
    got, reference = edgediff.load(on.path)(*inputs), edgediff.load(off.path)(*inputs)
    _close(got, reference)


def test_arm_a78_panels_follow_neon_width(tmp_path):
    torch.manual_seed(0)
    artifact = edgediff.compile_model(
        Chains().eval(), _inputs(), target="arm-a78", output_dir=tmp_path / "arm", progress=False
    )
    stored = _stored(artifact)
    # 4-lane NEON, two vectors per tile row: panels of 8, so the 16-column Linears are packed too
    assert stored["up.weight"] == [5, 16, 8]
    assert stored["geglu.weight"] == [2, 3, 16, 8]
    assert stored["down.weight"] == [2, 40, 8]
    schedule = _report(artifact, "schedule")
    assert schedule["scheduled"] == schedule["kernels"] and not schedule["rule_failures"], schedule
    assert artifact.manifest["library"]["format"] == "shared"
