"""CPU schedule rules (edgediff/schedules/): same numbers as the unscheduled kernels, every kernel
taken by a rule, tiles sized from the target spec, and builds for arm-a78. No timing assertions: speed is
measured by benchmarks/bench.py."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import edgediff
from edgediff.targets import CostModel, load_target

TOLERANCE = 1e-4


class OpMix(torch.nn.Module):
    """One of each op family the rules cover, with shapes that do not divide the vector width."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(8, 12, 3, padding=1)  # 3x3, residual epilogue
        self.down = torch.nn.Conv2d(12, 12, 3, stride=2, padding=1)  # strided
        self.proj = torch.nn.Conv2d(12, 20, 1)  # 1x1
        self.odd = torch.nn.Conv2d(20, 7, 3, padding=0)  # no padding, 7 channels, odd width
        self.norm = torch.nn.GroupNorm(4, 20)
        self.linear = torch.nn.Linear(20, 24)
        self.attention = torch.nn.MultiheadAttention(24, 2, batch_first=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv(x) + torch.nn.functional.pad(x, (0, 0, 0, 0, 0, 4))
        h = torch.nn.functional.silu(self.norm(self.proj(self.down(h))))
        tokens = self.linear(h.flatten(2).transpose(1, 2))  # (1, 25, 24)
        attended, _ = self.attention(tokens, tokens, tokens, need_weights=False)
        tail = self.odd(h).mean(dim=(2, 3))  # (1, 7)
        return torch.cat([attended.flatten(1), torch.softmax(tail, dim=-1)], dim=1)


def _run(artifact: edgediff.Artifact, inputs: tuple[torch.Tensor, ...]) -> np.ndarray:
    return edgediff.load(artifact.path)(*inputs)


def _schedule_report(artifact: edgediff.Artifact) -> dict:
    return next(p for p in artifact.manifest["passes"] if p["name"] == "schedule")["report"]


def _close(got: np.ndarray, expected: np.ndarray) -> float:
    err = float(np.abs(got - expected).max())
    assert err <= TOLERANCE * max(1.0, float(np.abs(expected).max())), err
    return err


def test_op_families_match_unscheduled_and_torch(tmp_path):
    torch.manual_seed(0)
    model = OpMix().eval()
    inputs = (torch.randn(1, 8, 10, 10),)
    with torch.no_grad():
        expected = model(*inputs).numpy()
    scheduled = edgediff.compile_model(model, inputs, output_dir=tmp_path / "on", progress=False)
    plain = edgediff.compile_model(
        model, inputs, output_dir=tmp_path / "off", passes={"schedule": False}, progress=False
    )
    got, reference = _run(scheduled, inputs), _run(plain, inputs)
    _close(got, expected)
    _close(reference, expected)
    _close(got, reference)
    report = _schedule_report(scheduled)
    assert report["scheduled"] == report["kernels"] and not report["rule_failures"]
    assert {"Conv2d", "Matmul", "GeneralReduction", "Elementwise"} <= set(report["kernels_by_rule"])
    assert report["kernels_by_rule"]["Conv2d"] >= 4


@pytest.mark.parametrize("name", ["tiny-sd15-unet", "tiny-vae-decoder", "tiny-dit"])
def test_tiny_models_equal_with_and_without_schedules(name, compiled, zoo_model, tmp_path):
    zm = zoo_model(name)
    scheduled = compiled(name, "host")
    plain = edgediff.compile_model(
        name, output_dir=tmp_path / name, passes={"schedule": False}, progress=False
    )
    with torch.no_grad():
        expected = zm.module(*zm.example_inputs).numpy()
    got, reference = _run(scheduled, zm.example_inputs), _run(plain, zm.example_inputs)
    print(
        f"{name}: scheduled vs torch {_close(got, expected):.1e}, vs unscheduled {_close(got, reference):.1e}"
    )
    report = _schedule_report(scheduled)
    assert report["scheduled"] == report["kernels"], report
    assert not report["rule_failures"], report["rule_failures"]


@pytest.mark.slow
def test_arm_a78_build_uses_neon_tiles(compiled):
    artifact = compiled("tiny-sd15-unet", "arm-a78")
    report = _schedule_report(artifact)
    assert report["scheduled"] == report["kernels"] and not report["rule_failures"]
    assert report["kernels_by_rule"]["Conv2d"] > 0 and report["kernels_by_rule"]["Matmul"] > 0
    assert artifact.manifest["library"]["format"] == "shared"


def test_register_tiles_follow_the_target_spec():
    from edgediff.schedules.common import choose_register_tile

    a78 = CostModel(load_target("arm-a78"))
    assert a78.vector_registers() == 32 and a78.accumulator_vectors() == 16
    tile = choose_register_tile(a78, "float32", rows=320, cols=64)
    assert tile.width == 4  # 128-bit NEON
    assert tile.rows * tile.col_vectors <= 16
    fp16 = choose_register_tile(a78, "float16", rows=320, cols=64)
    assert fp16.width == 8
    # widths that the vector does not divide fall back to the widest power of two that does
    assert choose_register_tile(a78, "float32", rows=7, cols=10).width == 2
    assert choose_register_tile(a78, "float32", rows=7, cols=10).rows == 7
    single_core = load_target("arm-a78")
    assert CostModel(single_core).parallel_threshold() > 0


def test_kernel_profile_times_every_kernel(compiled, zoo_model):
    import tvm

    from edgediff.backend.profile import profile_vm

    artifact = compiled("tiny-vae-decoder", "host")
    module = edgediff.load(artifact.path)
    zm = zoo_model("tiny-vae-decoder")
    args = [tvm.runtime.tensor(x.numpy()) for x in zm.example_inputs] + list(module._weights)
    profile = profile_vm(module._vm, args, runs=2)
    assert profile.runs == 2 and profile.total > 0
    assert any("conv2d" in name for name in profile.seconds)
    assert "conv2d" in profile.by_family()
    assert "all kernels" in profile.table()


def test_loading_sets_tvm_threads_from_the_target(monkeypatch):
    from edgediff.runtime.threads import use_target_cores

    monkeypatch.delenv("TVM_NUM_THREADS", raising=False)
    assert use_target_cores({"target": {"compute": {"cores": 4}}}) == 4
    monkeypatch.setenv("TVM_NUM_THREADS", "3")  # the user's choice wins
    assert use_target_cores({"target": {"compute": {"cores": 4}}}) == 3


def test_schedule_pass_leaves_its_input_module_unchanged():
    from edgediff.frontend.capture import capture
    from edgediff.frontend.relax_import import import_to_relax
    from edgediff.passes.runner import run_passes
    from edgediff.schedules.rules import is_scheduled
    from edgediff.targets import load_target

    spec = load_target("host")
    imported = import_to_relax(capture("tiny-vae-decoder"))
    legalized, _ = run_passes(imported.mod, spec, ["legalize", "fuse-ops"])
    before = {gv.name_hint: f for gv, f in legalized.functions_items()}
    scheduled, _ = run_passes(legalized, spec, ["schedule"])
    assert any(is_scheduled(f) for f in scheduled.functions.values() if hasattr(f, "attrs") and f.attrs)
    assert not any(is_scheduled(f) for f in before.values() if hasattr(f, "attrs") and f.attrs)
    for gv, func in legalized.functions_items():
        assert func.same_as(before[gv.name_hint])
