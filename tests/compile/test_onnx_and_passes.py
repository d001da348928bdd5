"""ONNX input, and switching passes off by name."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import edgediff
from edgediff.errors import CaptureError, InputError


class _Block(torch.nn.Module):
    """Conv + GroupNorm + SiLU + self-attention: the shape of a diffusion UNet block."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(4, 16, 3, padding=1)
        self.norm = torch.nn.GroupNorm(4, 16)
        # separate projections: a chunked qkv exports to ONNX shape arithmetic that TVM's ONNX importer
        # leaves dynamic
        self.q = torch.nn.Linear(16, 16)
        self.k = torch.nn.Linear(16, 16)
        self.v = torch.nn.Linear(16, 16)
        self.out = torch.nn.Linear(16, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.nn.functional.silu(self.norm(self.conv(x)))
        b, c, hh, ww = h.shape
        tokens = h.flatten(2).transpose(1, 2)
        q, k, v = self.q(tokens), self.k(tokens), self.v(tokens)
        attn = torch.softmax(q @ k.transpose(1, 2) / c**0.5, dim=-1)
        tokens = self.out(attn @ v) + tokens
        return tokens.transpose(1, 2).reshape(b, c, hh, ww)


def _export_onnx(path, model, x):
    torch.onnx.export(model, (x,), str(path), dynamo=False, input_names=["latent"], output_names=["features"])


def test_onnx_file_compiles_and_matches_torch(tmp_path):
    torch.manual_seed(0)
    model = _Block().eval()
    x = torch.randn(1, 4, 8, 8)
    _export_onnx(tmp_path / "block.onnx", model, x)
    artifact = edgediff.compile_model(
        tmp_path / "block.onnx", target="host", output_dir=tmp_path / "a", progress=False
    )
    assert [i["name"] for i in artifact.manifest["inputs"]] == ["latent"]
    assert [o["name"] for o in artifact.manifest["outputs"]] == ["features"]
    assert artifact.manifest["model"]["source"] == "onnx"
    got = artifact.load()(x.numpy())
    np.testing.assert_allclose(got, model(x).detach().numpy(), atol=1e-4)


def test_invalid_onnx_file(tmp_path):
    path = tmp_path / "broken.onnx"
    path.write_bytes(b"this is not a protobuf")
    with pytest.raises(CaptureError, match="broken.onnx.*not a valid ONNX model"):
        edgediff.compile_model(path, target="host", progress=False)


def test_onnx_example_inputs_count_checked(tmp_path):
    model = _Block().eval()
    x = torch.randn(1, 4, 8, 8)
    _export_onnx(tmp_path / "block.onnx", model, x)
    with pytest.raises(InputError, match="2 example inputs for 1 graph inputs"):
        edgediff.compile_model(tmp_path / "block.onnx", (x, x), target="host", progress=False)


def test_switching_off_fusion_changes_launches_not_numerics(tmp_path):
    torch.manual_seed(0)
    model = _Block().eval()
    x = torch.randn(1, 4, 8, 8)
    fused = edgediff.compile_model(model, (x,), "host", output_dir=tmp_path / "fused", progress=False)
    unfused = edgediff.compile_model(
        model, (x,), "host", passes={"fuse-ops": False}, output_dir=tmp_path / "unfused", progress=False
    )
    fused_passes = [p["name"] for p in fused.manifest["passes"]]
    unfused_passes = [p["name"] for p in unfused.manifest["passes"]]
    assert "fuse-ops" in fused_passes and "fuse-ops" not in unfused_passes
    report = next(p for p in fused.manifest["passes"] if p["name"] == "fuse-ops")["report"]
    assert report["launches_after"] < report["launches_before"]
    expected = model(x).detach().numpy()
    np.testing.assert_allclose(fused.load()(x), expected, atol=1e-5)
    np.testing.assert_allclose(unfused.load()(x), expected, atol=1e-5)


def test_explicit_pass_list_runs_in_compiler_order(tmp_path):
    model = _Block().eval()
    x = torch.randn(1, 4, 8, 8)
    artifact = edgediff.compile_model(
        model, (x,), "host", passes=["schedule", "legalize"], output_dir=tmp_path / "a", progress=False
    )
    assert [p["name"] for p in artifact.manifest["passes"]] == ["legalize", "schedule"]
