"""Weight-only int8 (``w8``) 3x3 convs take Winograd where the cost model chooses it: the int8 weight stays
int8 in weights.bin and its weight transform runs on every call (kept un-lifted), the per-channel scale on
the output. No timing assertions: the speed is measured by ``benchmarks/w8_conv.py``."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import edgediff
from tests.precision.ties import assert_matches_measurement

CHANNELS = 64
SIZE = 32


class _Block(torch.nn.Module):
    """A 3x3 conv large enough for Winograd (64 channels, 32x32) and a 1x1 conv that is not eligible."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(CHANNELS, CHANNELS, 3, padding=1)
        self.proj = torch.nn.Conv2d(CHANNELS, CHANNELS, 1)  # a denoiser: out like the latent

    def forward(self, x: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        # (the timestep input: the precision measurement replays a denoiser's calls)
        return self.proj(torch.relu(self.conv(x))) * (1 + timestep.float()[:, None, None, None] / 1000)


def _reports(artifact) -> dict:
    return {p["name"]: p["report"] for p in artifact.manifest["passes"]}


@pytest.fixture(scope="module")
def builds(host_int8, tmp_path_factory):
    torch.manual_seed(0)
    model = _Block().eval()
    inputs = (torch.randn(1, CHANNELS, SIZE, SIZE), torch.tensor([500.0]))
    root = tmp_path_factory.mktemp("w8wino")
    options = {"auto": None, "direct": {"winograd-conv2d": {"variant": "direct"}}}
    artifacts = {
        name: edgediff.compile_model(
            model,
            inputs,
            target=host_int8,
            input_names=("sample", "timestep"),
            output_dir=root / name,
            progress=False,
            precision="w8",
            pass_options=option,
        )
        for name, option in options.items()
    }
    return model, inputs, artifacts


def test_w8_conv_is_rewritten_with_its_weight_transform_at_run_time(builds):
    _, _, artifacts = builds
    reports = _reports(artifacts["auto"])
    assert reports["mixed-precision"]["rewritten"]["conv2d w8"] == 2
    (layer,) = reports["winograd-conv2d"]["layers"]  # the 3x3 conv; the 1x1 is not eligible
    assert layer["layer"] == "conv" and layer["chosen"] != "direct", layer
    assert layer["shape"] == f"{CHANNELS}->{CHANNELS} {SIZE}x{SIZE} float32 (int8 weight)"
    # stored as int8: no growth, whatever the variant
    assert layer["weight_bytes"] == layer["transformed_weight_bytes"] == CHANNELS * CHANNELS * 9
    schedule = reports["schedule"]
    assert schedule["scheduled"] == schedule["kernels"] and not schedule["rule_failures"], schedule
    # weight, input and output transforms: the weight transform is a run-time kernel here (lifted, as for a
    # float weight, it would be computed at compile time and there would be two)
    assert schedule["kernels_by_rule"]["WinogradTransform"] == 3
    lift = reports["lift-weight-transforms"]
    assert lift.get("kept_unlifted_weights", 0) >= 1
    stored = [tensor["name"] for tensor in artifacts["auto"].manifest["weights"]["tensors"]]
    assert not any("winograd" in name for name in stored), stored
    # the direct build has no Winograd kernel at all
    direct = _reports(artifacts["direct"])
    assert [layer["chosen"] for layer in direct["winograd-conv2d"]["layers"]] == ["direct"]
    assert "WinogradTransform" not in direct["schedule"]["kernels_by_rule"]


def test_w8_winograd_weights_bin_keeps_the_int8_weight(builds):
    _, _, artifacts = builds
    sizes = {name: (a.path / "weights.bin").stat().st_size for name, a in artifacts.items()}
    assert sizes["auto"] == sizes["direct"], sizes
    tensors = {t["name"]: t for t in artifacts["auto"].manifest["weights"]["tensors"]}
    int8 = [t for t in tensors.values() if t["dtype"] == "int8"]
    assert sorted(int(np.prod(t["shape"])) for t in int8) == [CHANNELS * CHANNELS, CHANNELS * CHANNELS * 9]
    # int8 weights, float32 scales and biases: under a third of the float32 model's weight bytes
    float_bytes = 4 * (CHANNELS * CHANNELS * 10 + 2 * CHANNELS)
    assert sizes["auto"] < float_bytes / 3


def test_w8_winograd_computes_the_dequantized_model(builds):
    from edgediff.precision import PrecisionPlan

    model, inputs, artifacts = builds
    plan = PrecisionPlan.from_dict(_reports(artifacts["auto"])["mixed-precision"]["plan"])
    got = artifacts["auto"].load()(*inputs)
    bound = _reports(artifacts["auto"])["winograd-conv2d"]["layers"][0]["bound"]
    # the fake-quant model is torch with the dequantized weights; Winograd adds at most its error bound
    assert_matches_measurement(got, model, inputs, plan, 2 * bound)
    direct = artifacts["direct"].load()(*inputs)
    assert float(np.abs(got - direct).max()) <= 2 * bound * float(np.abs(direct).max())
