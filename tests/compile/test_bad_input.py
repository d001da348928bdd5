"""Bad input gives one clear error naming what is wrong, and never a half-written artifact."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

import edgediff
from edgediff.errors import (
    ArtifactError,
    BuildError,
    CrossCompilerNotFoundError,
    InputError,
    ModelNotFoundError,
    PassError,
    TargetSpecError,
    UnsupportedOpError,
)


class _QR(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.linalg.qr(x)[0]


class _Unsupported(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.blocks = torch.nn.ModuleList([torch.nn.Linear(4, 4), _QR()])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks[1](self.blocks[0](x))


class _Small(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.conv(x))


def test_unsupported_op_names_op_node_and_module_path(tmp_path):
    with pytest.raises(UnsupportedOpError) as info:
        edgediff.compile_model(
            _Unsupported(), (torch.randn(4, 4),), "host", output_dir=tmp_path / "a", progress=False
        )
    message = str(info.value)
    assert "linalg_qr" in message and "fx node 'linalg_qr'" in message and "module 'blocks.1'" in message
    assert not (tmp_path / "a").exists()


def test_unknown_target_lists_builtins(tmp_path):
    with pytest.raises(TargetSpecError, match="unknown target 'pixel-99'.*arm-a78"):
        edgediff.compile_model(_Small(), (torch.randn(1, 3, 8, 8),), "pixel-99", output_dir=tmp_path / "a")


def test_invalid_target_yaml_names_file_and_key(tmp_path):
    spec = tmp_path / "phone.yaml"
    spec.write_text((edgediff_builtin("arm-a78")).replace("cores: 4", "cores: many"))
    with pytest.raises(TargetSpecError, match=r"phone\.yaml.*compute\.cores"):
        edgediff.compile_model(_Small(), (torch.randn(1, 3, 8, 8),), str(spec), output_dir=tmp_path / "a")


def edgediff_builtin(name: str) -> str:
    from importlib import resources

    return resources.files("edgediff.targets").joinpath(f"builtin/{name}.yaml").read_text()


def _target_with_compiler(tmp_path, compiler: str) -> str:
    text = edgediff_builtin("arm-a78").replace("aarch64-linux-gnu-g++", compiler)
    assert compiler in text
    path = tmp_path / "nocc.yaml"
    path.write_text(text)
    return str(path)


def test_missing_cross_compiler_falls_back_to_objects_with_a_note(tmp_path):
    target = _target_with_compiler(tmp_path, "no-such-aarch64-g++")
    artifact = edgediff.compile_model(
        _Small(), (torch.randn(1, 3, 8, 8),), target, output_dir=tmp_path / "a", progress=False
    )
    assert artifact.manifest["library"]["format"] == "objects"
    assert artifact.library_path.name == "model.tar"
    assert any(
        "no-such-aarch64-g++" in note and "not installed" in note for note in artifact.manifest["notes"]
    )


def test_missing_cross_compiler_is_an_error_when_required(tmp_path):
    target = _target_with_compiler(tmp_path, "no-such-aarch64-g++")
    with pytest.raises(CrossCompilerNotFoundError, match="no-such-aarch64-g\\+\\+"):
        edgediff.compile_model(
            _Small(),
            (torch.randn(1, 3, 8, 8),),
            target,
            output_dir=tmp_path / "a",
            progress=False,
            require_cross_compiler=True,
        )
    assert not (tmp_path / "a").exists()
    assert not list(tmp_path.glob(".a.partial-*"))


def test_unknown_model_name_and_path():
    with pytest.raises(ModelNotFoundError, match="tiny-sd15-unet"):
        edgediff.compile_model("tiny-sd15-unett", target="host", progress=False)
    with pytest.raises(ModelNotFoundError, match="does not exist"):
        edgediff.compile_model("./no/such/folder", target="host", progress=False)


def test_unknown_and_required_passes(tmp_path):
    with pytest.raises(PassError, match="did you mean 'fuse-ops'"):
        edgediff.compile_model(_Small(), (torch.randn(1, 3, 8, 8),), "host", passes={"fuse-op": False})
    with pytest.raises(PassError, match="'legalize' is required"):
        edgediff.compile_model(_Small(), (torch.randn(1, 3, 8, 8),), "host", passes={"legalize": False})


@pytest.fixture()
def small_artifact(tmp_path):
    torch.manual_seed(0)  # the same weights and input on every run
    model = _Small().eval()
    x = torch.randn(1, 3, 8, 8)
    artifact = edgediff.compile_model(model, (x,), "host", output_dir=tmp_path / "small", progress=False)
    return artifact, model, x


def test_shape_and_count_mismatch_at_run_time(small_artifact):
    artifact, _, _ = small_artifact
    module = artifact.load()
    with pytest.raises(InputError, match=r"input 'x' has shape \[1, 3, 9, 8\], expected \[1, 3, 8, 8\]"):
        module(np.zeros((1, 3, 9, 8), np.float32))
    with pytest.raises(InputError, match="got 2 inputs, expected 1"):
        module(np.zeros((1, 3, 8, 8), np.float32), np.zeros(1, np.float32))
    with pytest.raises(InputError, match="is complex64, expected float32"):
        module(np.zeros((1, 3, 8, 8), np.complex64))


def test_torch_and_numpy_inputs_give_the_same_numpy_output(small_artifact):
    artifact, model, x = small_artifact
    module = artifact.load()
    from_torch = module(x)
    from_numpy = module(x.numpy())
    assert isinstance(from_torch, np.ndarray)
    np.testing.assert_array_equal(from_torch, from_numpy)
    np.testing.assert_allclose(from_numpy, model(x).detach().numpy(), atol=1e-5)


def test_corrupted_weights_fail_the_hash_check(small_artifact):
    artifact, _, _ = small_artifact
    weights = artifact.path / "weights.bin"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="weights.bin.*sha256"):
        edgediff.load(artifact.path)


def test_truncated_library_and_missing_files(small_artifact):
    artifact, _, _ = small_artifact
    library = artifact.library_path
    library.write_bytes(library.read_bytes()[:-10])
    with pytest.raises(ArtifactError, match="model.so.*bytes"):
        edgediff.load(artifact.path)
    library.unlink()
    with pytest.raises(ArtifactError, match="model.so' is missing"):
        edgediff.load(artifact.path)


def test_mismatched_versions_are_refused(small_artifact):
    artifact, _, _ = small_artifact
    manifest_path = artifact.path / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["versions"]["tvm"] = "0.19.0"
    manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match="built with TVM 0.19.0"):
        edgediff.load(artifact.path)
    manifest["format_version"] = 99
    manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match="format version 99"):
        edgediff.load(artifact.path)
    manifest_path.write_text("{ not json")
    with pytest.raises(ArtifactError, match="corrupted manifest"):
        edgediff.load(artifact.path)
    shutil.rmtree(artifact.path)
    with pytest.raises(ArtifactError, match="does not exist"):
        edgediff.load(artifact.path)


def test_failed_compile_keeps_the_previous_artifact(small_artifact, monkeypatch):
    artifact, _, x = small_artifact
    before = (artifact.path / "manifest.json").read_text()

    def broken_build(mod, spec, **_options):
        raise BuildError("simulated failure")

    monkeypatch.setattr("edgediff.api.build", broken_build)
    with pytest.raises(BuildError):
        edgediff.compile_model(_Small(), (x,), "host", output_dir=artifact.path, progress=False)
    assert (artifact.path / "manifest.json").read_text() == before
    assert not list(artifact.path.parent.glob(".small.partial-*"))
    edgediff.load(artifact.path)


def test_interrupted_write_leaves_no_partial_directory(tmp_path, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("edgediff.api.write_weights", interrupted)
    with pytest.raises(KeyboardInterrupt):
        edgediff.compile_model(
            _Small(), (torch.randn(1, 3, 8, 8),), "host", output_dir=tmp_path / "a", progress=False
        )
    assert list(tmp_path.iterdir()) == []


def test_recompiling_into_the_same_directory_loads_the_new_library(tmp_path):
    # the dynamic loader keeps the first library opened from a path: the runtime must not hand it back
    out = tmp_path / "model"
    results = []
    for width in (3, 5):
        torch.manual_seed(width)
        model = torch.nn.Linear(4, width).eval()
        inputs = (torch.randn(2, 4),)
        edgediff.compile_model(model, inputs, output_dir=out, progress=False)
        got = edgediff.load(out)(*inputs)
        with torch.no_grad():
            np.testing.assert_allclose(got, model(*inputs).numpy(), rtol=1e-5, atol=1e-6)
        results.append(got.shape)
    assert results == [(2, 3), (2, 5)]
