"""``bf16`` convolutions run on the float32 conv kernels: the data rounded to bfloat16 (integer ops on its
bits, fused into the producer), the bfloat16 weight widened inside the kernel, or by Winograd's weight
transform on every call. The products are those of a bfloat16 conv with float32 accumulation. No timing
assertions: the speed is measured by ``edgediff bench --precisions bf16`` (BENCHMARKS.md)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import tvm

from tests.conftest import pinned_host_with
from tests.precision.helpers import compile_at, host_target, rewrite_counts
from tests.precision.test_weight_only_winograd import CHANNELS, SIZE, _Block


def _bf16(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.bfloat16).to(torch.float64)


def _reference(model: _Block, x: torch.Tensor, round_data: bool = True) -> np.ndarray:
    """The block in float64 on bfloat16 weights and (``round_data``) bfloat16-rounded conv inputs."""
    data = _bf16 if round_data else (lambda t: t.to(torch.float64))
    conv2d = torch.nn.functional.conv2d
    with torch.no_grad():
        conv = conv2d(data(x), _bf16(model.conv.weight), model.conv.bias.double(), padding=1)
        proj = conv2d(data(conv.relu()), _bf16(model.proj.weight), model.proj.bias.double())
    return (proj * 1.5).numpy()  # timestep 500


@pytest.fixture(scope="module")
def builds(tmp_path_factory):
    torch.manual_seed(0)
    model = _Block().eval()
    inputs = (torch.randn(1, CHANNELS, SIZE, SIZE), torch.tensor([500.0]))
    root = tmp_path_factory.mktemp("bf16conv")
    spec = pinned_host_with("bfloat16")
    options = {"auto": None, "direct": {"winograd-conv2d": {"variant": "direct"}}}
    names = ("sample", "timestep")
    artifacts = {
        name: compile_at(model, inputs, names, spec, root / name, "bf16", pass_options=option)
        for name, option in options.items()
    }
    return model, inputs, artifacts


def test_bf16_convs_take_the_float32_kernels_and_winograd(builds):
    _, _, artifacts = builds
    reports = {p["name"]: p["report"] for p in artifacts["auto"].manifest["passes"]}
    assert rewrite_counts(artifacts["auto"])["conv2d bf16 on the float32 conv kernels"] == 2
    (layer,) = reports["winograd-conv2d"]["layers"]
    assert layer["chosen"] != "direct" and layer["shape"].endswith("(bfloat16 weight)"), layer
    assert layer["weight_bytes"] == layer["transformed_weight_bytes"] == CHANNELS * CHANNELS * 9 * 2
    stored = {t["name"]: t["dtype"] for t in artifacts["auto"].manifest["weights"]["tensors"]}
    assert stored["conv.weight"] == stored["proj.weight"] == "bfloat16"
    assert reports["schedule"]["kernels_by_rule"]["WinogradTransform"] == 3


def test_bf16_convs_compute_bfloat16_products(builds):
    model, inputs, artifacts = builds
    want = _reference(model, inputs[0])
    unrounded = _reference(model, inputs[0], round_data=False)
    scale = float(np.abs(want).max())
    for name, artifact in artifacts.items():
        got = artifact.load()(*inputs)
        error = float(np.abs(got - want).max()) / scale
        # the data really is rounded: the build is far closer to the rounded reference than to one with
        # bfloat16 weights alone (that gap is ~3e-3 here; a tie the float32 order flips costs ~4e-4)
        assert error < 1e-3, (name, error)
        assert float(np.abs(got - unrounded).max()) / scale > 3 * error, name


def test_round_to_bfloat16_is_torch_s_rounding():
    from tvm import te

    from edgediff.kernels.dequantize import round_to_bfloat16_te

    rng = np.random.default_rng(0)
    values = rng.standard_normal(4096).astype(np.float32) * np.float32(1e3)
    bits = values.view(np.uint32)
    bits[:1024] = (bits[:1024] & np.uint32(0xFFFF0000)) | np.uint32(0x8000)  # exact ties: to even
    x = te.placeholder((4096,), "float32", name="x")
    func = te.create_prim_func([x, round_to_bfloat16_te(x)])
    ex = tvm.compile(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}), host_target())
    out = tvm.runtime.tensor(np.zeros(4096, np.float32))
    ex["main"](tvm.runtime.tensor(values), out)
    want = torch.from_numpy(values).to(torch.bfloat16).to(torch.float32).numpy()
    np.testing.assert_array_equal(out.numpy(), want)
