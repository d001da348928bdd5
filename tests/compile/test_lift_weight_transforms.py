"""lift-weight-transforms: weight-only computations run once at compile time, their results are stored, and
the compiled model computes the same numbers as without the pass."""

from __future__ import annotations

import numpy as np
import torch

import edgediff
from edgediff.runtime.artifact import load_weights
from tests.conftest import AARCH64, elf_machine

TOLERANCE = 1e-5


class LinearBlock(torch.nn.Module):
    """Linear layers (weights transposed by Relax), a conv with bias (bias reshaped) and a GroupNorm."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(4, 8, 3, padding=1)
        self.norm = torch.nn.GroupNorm(2, 8)
        self.proj = torch.nn.Linear(8, 12)
        self.out = torch.nn.Linear(12, 6, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.nn.functional.silu(self.norm(self.conv(x)))
        return self.out(torch.nn.functional.gelu(self.proj(h.flatten(2).transpose(1, 2))))


def _compile(tmp_path, name: str, passes: dict | None = None, **options):
    torch.manual_seed(0)
    model = LinearBlock().eval()
    inputs = (torch.randn(1, 4, 6, 5),)
    # pack-matmul-weights (tested on its own) would store the Linear weights as panels: these tests look at
    # what lifting alone stores
    passes = {"pack-matmul-weights": False, **(passes or {})}
    artifact = edgediff.compile_model(
        model, inputs, output_dir=tmp_path / name, passes=passes, progress=False, **options
    )
    with torch.no_grad():
        expected = model(*inputs).numpy()
    return model, inputs, expected, artifact


def _report(artifact: edgediff.Artifact, name: str) -> dict:
    return next(p["report"] for p in artifact.manifest["passes"] if p["name"] == name)


def test_linear_weights_are_stored_transposed_and_the_results_match(tmp_path):
    model, inputs, expected, lifted = _compile(tmp_path, "on")
    _, _, _, plain = _compile(tmp_path, "off", passes={"lift-weight-transforms": False})

    got_lifted = edgediff.load(lifted.path)(*inputs)
    got_plain = edgediff.load(plain.path)(*inputs)
    assert np.abs(got_lifted - expected).max() <= TOLERANCE
    assert np.abs(got_lifted - got_plain).max() <= TOLERANCE

    report = _report(lifted, "lift-weight-transforms")
    assert report["lifted"] == 3 and report["launches_removed"] >= 4
    # the transposes are gone from the per-call module: fewer launches reach fusion
    assert (
        _report(lifted, "fuse-ops")["launches_before"]
        <= _report(plain, "fuse-ops")["launches_before"] - report["launches_removed"]
    )

    tensors = lifted.manifest["weights"]["tensors"]
    stored = dict(zip([t["name"] for t in tensors], load_weights(lifted.path, lifted.manifest), strict=True))
    # named after the source weight and the kernel that made it, holding the transform's result
    # torch.export expands a 3-D linear's weight to a batched matmul operand: transpose + broadcast, lifted
    proj = model.proj.weight.detach().numpy()
    np.testing.assert_array_equal(stored["proj.weight:broadcast_to"], proj.T[None])
    np.testing.assert_array_equal(stored["out.weight:transpose"], model.out.weight.detach().numpy().T)
    assert "conv.weight" in stored  # a weight used as it is stays under its own name
    assert not any(name.startswith("proj.weight") and ":" not in name for name in stored)


def test_quantized_weights_stay_quantized(tmp_path, host_int8):
    _, inputs, _, lifted = _compile(tmp_path, "on", target=host_int8, precision="w8")
    _, _, _, plain = _compile(
        tmp_path, "off", target=host_int8, precision="w8", passes={"lift-weight-transforms": False}
    )
    dtypes_on = sorted(t["dtype"] for t in lifted.manifest["weights"]["tensors"])
    dtypes_off = sorted(t["dtype"] for t in plain.manifest["weights"]["tensors"])
    # the int8 weights are written as int8 (their transposes may lift; a dequantization may not)
    assert dtypes_on.count("int8") == dtypes_off.count("int8") >= 3
    assert lifted.manifest["weights"]["bytes"] <= plain.manifest["weights"]["bytes"] + 64 * len(dtypes_on)
    got_lifted = edgediff.load(lifted.path)(*inputs)
    got_plain = edgediff.load(plain.path)(*inputs)
    assert np.abs(got_lifted - got_plain).max() <= TOLERANCE


def test_cross_target_runs_the_transform_on_the_compiling_host(tmp_path):
    _, _, _, artifact = _compile(tmp_path, "arm", target="arm-a78")
    names = [t["name"] for t in artifact.manifest["weights"]["tensors"]]
    assert "out.weight:transpose" in names
    assert artifact.manifest["library"]["format"] == "shared"
    assert elf_machine(artifact.path / "model.so") == AARCH64


def test_a_model_whose_weights_need_no_transform_compiles_unchanged(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.GroupNorm(2, 8).eval()  # its weights reach the kernel as they are
    inputs = (torch.randn(1, 8, 4, 4),)
    artifact = edgediff.compile_model(model, inputs, output_dir=tmp_path / "gn", progress=False)
    assert _report(artifact, "lift-weight-transforms")["lifted"] == 0
    assert [t["name"] for t in artifact.manifest["weights"]["tensors"]] == ["weight", "bias"]
    with torch.no_grad():
        assert np.abs(edgediff.load(artifact.path)(*inputs) - model(*inputs).numpy()).max() <= TOLERANCE
