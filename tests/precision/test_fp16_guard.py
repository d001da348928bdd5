"""fp16 overflow guard: layers whose activations exceed the float16 range keep float32 in fp16 builds.

``OverflowDecoder`` is a VAE-decoder-like stack (GroupNorm -> SiLU -> conv residual blocks, an upsampler
conv reading the residual stream) with one conv's weights scaled so that its output, and the upsampler's
input, reach ~1e5: beyond float16's 65504, as in the SDXL VAE decoder. Without the guard its fp16 builds
compute inf/NaN; with it they are finite and match float32.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import edgediff
from edgediff.precision import PrecisionConfig, PrecisionPlan
from edgediff.precision.calibration import calibrate
from edgediff.precision.overflow import FP16_MAX, OverflowGuard, find_overflows
from edgediff.precision.report import render_text

NAMES = ("z",)
GUARDED = {"conv1", "up"}  # conv1's output and the upsampler's input are ~1e5


class OverflowDecoder(nn.Module):
    def __init__(self, overflow: bool) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        self.conv_in = nn.Conv2d(4, 8, 3, padding=1)
        self.norm1 = nn.GroupNorm(2, 8)
        self.conv1 = nn.Conv2d(8, 8, 3, padding=1)
        self.up = nn.Conv2d(8, 8, 3, padding=1)
        self.norm2 = nn.GroupNorm(2, 8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.norm_out = nn.GroupNorm(2, 8)
        self.conv_out = nn.Conv2d(8, 3, 3, padding=1)
        for p in self.parameters():
            p.data = torch.randn(p.shape, generator=gen) * 0.2
        if overflow:
            with torch.no_grad():
                self.norm1.weight.mul_(25.0)  # a trained block with a large gain ...
                self.conv1.weight.mul_(1e4)  # ... and large weights (each still < 65504)
                self.up.weight.mul_(1e-4)  # brings the stream back to ~1 after the upsampler
        self.eval().requires_grad_(False)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(z)
        h = h + self.conv1(nn.functional.silu(self.norm1(h)))
        h = self.up(nn.functional.interpolate(h, scale_factor=2.0, mode="nearest"))
        h = h + self.conv2(nn.functional.silu(self.norm2(h)))
        return self.conv_out(nn.functional.silu(self.norm_out(h)))


def _inputs() -> tuple[torch.Tensor]:
    return (torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(1)),)


def _compile(model: nn.Module, path, **options):
    return edgediff.compile_model(
        model, _inputs(), target="host", input_names=NAMES, output_dir=path, progress=False, **options
    )


def _run(artifact) -> np.ndarray:
    return np.asarray(artifact.load()(*_inputs()))


def _reference(model: nn.Module) -> np.ndarray:
    with torch.no_grad():
        return model(*_inputs()).numpy()


def _relative_error(got: np.ndarray, want: np.ndarray) -> float:
    return float(np.abs(got - want).max() / np.abs(want).max())


def _passes(artifact) -> dict:
    return {p["name"]: p["report"] for p in artifact.manifest["passes"]}


@pytest.fixture(scope="module")
def overflowing() -> OverflowDecoder:
    return OverflowDecoder(overflow=True)


@pytest.fixture(scope="module")
def builds(overflowing, tmp_path_factory) -> dict:
    """The overflowing model's fp16 builds: precision='fp16' (host, fp16 layers in an fp32 graph) and
    cast-to-fp16 (the float16 graph of targets without float32), each with and without the guard."""
    root = tmp_path_factory.mktemp("fp16guard")
    unguarded = PrecisionConfig(mode="fp16", fp16_headroom=None)
    return {
        "fp16": _compile(overflowing, root / "fp16", precision="fp16"),
        "fp16-unguarded": _compile(overflowing, root / "fp16-off", precision=unguarded),
        "cast": _compile(overflowing, root / "cast", passes={"cast-to-fp16": True}),
        "cast-unguarded": _compile(
            overflowing, root / "cast-off", passes={"cast-to-fp16": True, "fp16-overflow-guard": False}
        ),
    }


def test_calibration_records_activation_peaks_and_finds_the_overflowing_layers(overflowing):
    calibration = calibrate(overflowing, _inputs(), NAMES)
    peaks = calibration.activation_max
    assert {"conv_in", "conv1", "up", "conv2", "conv_out", "norm1", "norm2", "norm_out"} <= set(peaks)
    kind, conv1_in, conv1_out = peaks["conv1"]
    assert kind == "conv2d" and conv1_out > FP16_MAX > 100 * conv1_in  # the output overflows, not the input
    assert peaks["up"][1] > FP16_MAX and peaks["up"][2] < 1e3
    assert peaks["norm1"][0] == "norm" and peaks["norm1"][1] < 1e3 and peaks["norm2"][1] < 1e3
    guard = find_overflows(calibration)
    assert set(guard.names()) == GUARDED
    assert guard.limit == FP16_MAX / 4 and guard.largest[0] in GUARDED
    assert guard.weights()["conv1.weight"].name == "conv1"
    # the headroom decides: at 1 only activations beyond 65504 count; with a limit above the largest
    # activation seen nothing is guarded
    assert set(find_overflows(calibration, headroom=1.0).names()) == GUARDED
    assert find_overflows(calibration, headroom=FP16_MAX / (1.01 * guard.largest[1])).layers == []
    assert OverflowGuard.from_dict(guard.to_dict()).names() == guard.names()


def test_a_weight_beyond_the_fp16_range_is_guarded(overflowing):
    """A weight above 65504 becomes inf in fp16 storage, whatever the activations: guarded too."""
    model = OverflowDecoder(overflow=False)
    with torch.no_grad():
        model.conv2.weight[0, 0, 0, 0] = 1e5
    calibration = calibrate(model, _inputs(), NAMES)
    guard = find_overflows(calibration, module=model)
    assert guard.names() == ["conv2"]
    assert guard.weights()["conv2.weight"].reason(guard.limit) == "max |weight| 1e+05 > 65504 (fp16 max)"


def test_fp16_plan_overflows_without_the_guard_and_matches_fp32_with_it(overflowing, builds):
    reference = _reference(overflowing)
    assert not np.isfinite(_run(builds["fp16-unguarded"])).all()
    got = _run(builds["fp16"])
    assert np.isfinite(got).all() and _relative_error(got, reference) < 1e-2
    plan = PrecisionPlan.from_dict(_passes(builds["fp16"])["mixed-precision"]["plan"])
    formats = {layer.name: layer.format for layer in plan.layers}
    assert formats == {"conv_in": "fp16", "conv1": "fp32", "up": "fp32", "conv2": "fp16", "conv_out": "fp16"}
    assert "max |output|" in plan.layer("conv1").overflow and "max |input|" in plan.layer("up").overflow
    assert plan.layer("conv_in").overflow is None
    # the report names the guarded layers, the peak seen and the limit
    report = (builds["fp16"].path / "precision" / "report.txt").read_text()
    assert report == render_text(plan)
    assert "fp16 guard    fp16 overflow guard: 2 of 8 layers kept in fp32" in report
    peak = plan.fp16_guard["layers"][0]["output_max"]
    assert f"conv1 (conv2d): max |output| {peak:.4g} > 16376" in report
    assert "conv1     conv2d    fp32!" in report
    assert "fp16 overflow guard kept 2 in fp32 (conv1, up)" in builds["fp16"].describe()


def test_cast_to_fp16_build_overflows_without_the_guard_and_matches_fp32_with_it(overflowing, builds):
    reference = _reference(overflowing)
    assert "fp16-overflow-guard" not in _passes(builds["cast-unguarded"])
    assert not np.isfinite(_run(builds["cast-unguarded"])).all()
    got = _run(builds["cast"])
    assert np.isfinite(got).all() and _relative_error(got, reference) < 1e-2
    report = _passes(builds["cast"])["fp16-overflow-guard"]
    assert set(report["kept_fp32"]) == GUARDED and report["rewritten"] == 2
    assert "max |output|" in report["kept_fp32"]["conv1"]
    assert report["guard"]["limit"] == FP16_MAX / 4


def test_npu_build_runs_the_guarded_layers_on_the_host(overflowing, tmp_path):
    """ane-like computes in float16 and int8 only: the guarded convs leave the NPU for its host CPU."""
    artifact = edgediff.compile_model(
        overflowing, _inputs(), target="ane-like", input_names=NAMES, output_dir=tmp_path, progress=False
    )
    from edgediff.passes.pipeline import default_pipeline
    from edgediff.targets import load_target

    assert "fp16-overflow-guard" in default_pipeline(load_target("ane-like"))
    passes = _passes(artifact)
    assert set(passes["fp16-overflow-guard"]["kept_fp32"]) == GUARDED
    assert "host ops (relax.nn.conv2d)" in passes["npu-tiling"]["summary"]
    program = artifact.manifest["npu"]
    assert program["total"]["sram_peak"] > 0


def test_an_ordinary_model_keeps_every_layer_in_fp16(tmp_path):
    model = OverflowDecoder(overflow=False)
    artifact = _compile(model, tmp_path, precision="fp16", passes={"cast-to-fp16": True})
    passes = _passes(artifact)
    plan = PrecisionPlan.from_dict(passes["mixed-precision"]["plan"])
    assert {layer.format for layer in plan.layers} == {"fp16"}
    assert not any(layer.overflow for layer in plan.layers)
    guard = passes["fp16-overflow-guard"]
    assert guard["kept_fp32"] == {} and guard["rewritten"] == 0
    assert guard["summary"].startswith("fp16 overflow guard: all 8 layers within 16376")
    assert _relative_error(_run(artifact), _reference(model)) < 1e-2


def test_auto_plan_on_the_npu_keeps_overflowing_layers_in_fp32(overflowing):
    """ane-like has no float32: an overflowing layer takes none of its float16-computing formats (fp16, w8,
    w4) nor int8, but fp32 on the host CPU; the other layers are planned as usual."""
    from edgediff.precision.planner import make_plan
    from edgediff.targets import load_target

    weights = {name: (tuple(w.shape), "float32") for name, w in overflowing.state_dict().items()}
    spec = load_target("ane-like")
    plan = make_plan(overflowing, _inputs(), NAMES, {}, spec, PrecisionConfig(mode="auto"), weights=weights)
    formats = {layer.name: layer.format for layer in plan.layers}
    assert formats["conv1"] == formats["up"] == "fp32"
    assert all(formats[name] != "fp32" for name in ("conv_in", "conv2", "conv_out"))
    assert plan.layer("conv1").overflow and not plan.layer("conv2").overflow
    assert any("keep fp32 on the host CPU (conv1, up)" in note for note in plan.notes)
    assert "conv1     conv2d    fp32!" in render_text(plan)
    # the plan is valid for the target although it lacks float32 (guarded layers run on its host)
    from edgediff.precision.plan import resolve_request

    assert resolve_request(plan, None, spec) is plan
