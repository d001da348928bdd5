"""Weight-only int8 (``w8``) and int4 (``w4``) 3x3 convs take Winograd where the cost model chooses it: the
integer weight stays as it is in weights.bin and its weight transform runs on every call (kept un-lifted):
it widens the int8 weight (the per-channel scale on the output), or reads the int4 weight's nibbles and
group scales itself (no separate unpack kernel). No timing assertions: the speed is measured by
``benchmarks/w8_conv.py``."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.precision.helpers import compile_at
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


# precision -> (the stored weight's dtype in the layer report, its bits, the stored tensor's dtype)
STORED = {"w8": ("int8", 8, "int8"), "w4": ("int4", 4, "uint8")}


@pytest.fixture(scope="module", params=sorted(STORED))
def builds(request, host_int8, tmp_path_factory):
    precision = request.param
    torch.manual_seed(0)
    model = _Block().eval()
    inputs = (torch.randn(1, CHANNELS, SIZE, SIZE), torch.tensor([500.0]))
    root = tmp_path_factory.mktemp(f"{precision}wino")
    options = {"auto": None, "direct": {"winograd-conv2d": {"variant": "direct"}}}
    artifacts = {
        name: compile_at(
            model, inputs, ("sample", "timestep"), host_int8, root / name, precision, pass_options=option
        )
        for name, option in options.items()
    }
    return precision, model, inputs, artifacts


def test_weight_only_conv_is_rewritten_with_its_weight_transform_at_run_time(builds):
    precision, _, _, artifacts = builds
    dtype, bits, _ = STORED[precision]
    reports = _reports(artifacts["auto"])
    rewritten = reports["mixed-precision"]["rewritten"]
    # int8 weights are read by the conv itself; int4 ones are unpacked by a kernel (or by the transform)
    assert rewritten["conv2d w8" if precision == "w8" else "dequantize kernel (int4 or generic use)"] == 2
    (layer,) = reports["winograd-conv2d"]["layers"]  # the 3x3 conv; the 1x1 is not eligible
    assert layer["layer"] == "conv" and layer["chosen"] != "direct", layer
    assert layer["shape"] == f"{CHANNELS}->{CHANNELS} {SIZE}x{SIZE} float32 ({dtype} weight)"
    # stored as it is: no growth, whatever the variant
    assert layer["weight_bytes"] == layer["transformed_weight_bytes"] == CHANNELS * CHANNELS * 9 * bits // 8
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
    if precision == "w4":  # and one unpack kernel more: the Winograd conv's transform reads the nibbles
        # (the vectorized unpack kernel comes scheduled)
        unpacks = [r["schedule"]["kernels_by_rule"].get("(already scheduled)", 0) for r in (direct, reports)]
        assert unpacks[0] == unpacks[1] + 1, unpacks
    assert [layer["chosen"] for layer in direct["winograd-conv2d"]["layers"]] == ["direct"]
    assert "WinogradTransform" not in direct["schedule"]["kernels_by_rule"]


def test_weight_only_winograd_weights_bin_keeps_the_integer_weight(builds):
    precision, _, _, artifacts = builds
    _, bits, stored_dtype = STORED[precision]
    sizes = {name: (a.path / "weights.bin").stat().st_size for name, a in artifacts.items()}
    assert sizes["auto"] == sizes["direct"], sizes
    tensors = {t["name"]: t for t in artifacts["auto"].manifest["weights"]["tensors"]}
    integer = [t for t in tensors.values() if t["dtype"] == stored_dtype]
    want = [CHANNELS * CHANNELS * bits // 8, CHANNELS * CHANNELS * 9 * bits // 8]
    assert sorted(int(np.prod(t["shape"])) for t in integer) == want
    # integer weights, float32 scales and biases: under a third of the float32 model's weight bytes
    float_bytes = 4 * (CHANNELS * CHANNELS * 10 + 2 * CHANNELS)
    assert sizes["auto"] < float_bytes / 3


def test_weight_only_winograd_computes_the_dequantized_model(builds):
    from edgediff.precision import PrecisionPlan

    _, model, inputs, artifacts = builds
    plan = PrecisionPlan.from_dict(_reports(artifacts["auto"])["mixed-precision"]["plan"])
    got = artifacts["auto"].load()(*inputs)
    bound = _reports(artifacts["auto"])["winograd-conv2d"]["layers"][0]["bound"]
    # the fake-quant model is torch with the dequantized weights; Winograd adds at most its error bound
    assert_matches_measurement(got, model, inputs, plan, 2 * bound)
    direct = artifacts["direct"].load()(*inputs)
    assert float(np.abs(got - direct).max()) <= 2 * bound * float(np.abs(direct).max())
