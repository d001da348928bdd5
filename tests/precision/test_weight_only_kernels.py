"""Weight-only int8 (``w8``) runs the fp32 kernels: the same schedule rules take its convolutions and Linear
layers, the int8 weight is widened inside their register-tiled loop nests (kernels/dequantize.py,
schedules/common.py ``dequantize_weights``), and the results are the fake-quant measurement's. int4
(``w4``) weights are unpacked by a vectorized kernel, exactly as the numpy dequantization. No timing
assertions: the speed is measured by ``edgediff bench --precisions w8`` (BENCHMARKS.md)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.precision.helpers import compile_at
from tests.precision.models import FragileDenoiser
from tests.precision.ties import assert_matches_measurement

CHANNELS = 64  # a multiple of every vector width's panel (pack-matmul-weights packs each Linear)


def _reports(artifact) -> dict:
    return {p["name"]: p["report"] for p in artifact.manifest["passes"]}


@pytest.fixture(scope="module")
def builds(host_int8, tmp_path_factory):
    model = FragileDenoiser(CHANNELS)
    gen = torch.Generator().manual_seed(1)
    inputs = (torch.randn(1, 4, 8, 8, generator=gen), torch.tensor([500.0]))
    root = tmp_path_factory.mktemp("w8")
    names = ("sample", "timestep")
    artifacts = {
        precision: compile_at(model, inputs, names, host_int8, root / str(precision), precision)
        for precision in (None, "w8")
    }
    return model, inputs, artifacts


def test_w8_kernels_take_the_fp32_rules_with_the_weight_widened_inside(builds):
    _, _, artifacts = builds
    fp32, w8 = (_reports(artifacts[p]) for p in (None, "w8"))
    rewritten = w8["mixed-precision"]["rewritten"]
    convs, linears = rewritten["conv2d w8"], rewritten["linear w8"]
    assert convs == 4 and linears == 5
    schedule = w8["schedule"]
    assert schedule["rule_failures"] == []
    for rule in ("Conv2d", "Matmul"):
        assert schedule["kernels_by_rule"][rule] == fp32["schedule"]["kernels_by_rule"][rule], rule
    # every int8 conv (C = 4: once per register tile; C = 64: per 16-channel chunk) and every packed
    # Linear widens its weight inside the tiled loop nest; none writes a float copy of a whole weight
    packed = w8["pack-matmul-weights"]["packed"]["matmul"]
    assert packed == fp32["pack-matmul-weights"]["packed"]["matmul"] >= 4
    # (kernels are counted once per distinct shape: every conv kernel, and the packed Linear kernels
    # among the Matmul rule's, which also takes the attention matmuls)
    widened = schedule["widened_in_kernel"]
    assert widened["Conv2d"] == schedule["kernels_by_rule"]["Conv2d"] >= 3
    assert 2 <= widened["Matmul"] <= schedule["kernels_by_rule"]["Matmul"]
    assert schedule["widened_whole"] == []
    # and nothing dequantizes a w8 weight in a kernel of its own
    assert not any("dequantize" in kind for kind in rewritten)


def test_w8_artifact_computes_the_fake_quant_measurement(builds):
    from edgediff.precision import PrecisionPlan

    model, inputs, artifacts = builds
    plan = PrecisionPlan.from_dict(_reports(artifacts["w8"])["mixed-precision"]["plan"])
    got = artifacts["w8"].load()(*inputs)
    assert_matches_measurement(got, model, inputs, plan, 1e-4)


def _run_kernel(sch, arrays: list[np.ndarray], out_shape: tuple[int, ...]) -> np.ndarray:
    import tvm

    from edgediff.targets import load_target

    target = load_target("host").build_target()
    with target:
        lib = tvm.compile(sch.mod, target=target)
    out = tvm.runtime.tensor(np.zeros(out_shape, "float32"))
    lib["main"](*(tvm.runtime.tensor(a) for a in arrays), out)
    return out.numpy()


@pytest.mark.parametrize("channels", [4, 48])
def test_conv2d_rule_widens_int8_weight_per_chunk(channels):
    from tvm import te, topi

    from edgediff.kernels.dequantize import DEQUANTIZE_BLOCK, weight_dequantize_te
    from edgediff.schedules import Conv2d
    from edgediff.schedules.common import widened_in_kernel
    from edgediff.targets import CostModel, load_target

    spec = load_target("host")
    x = te.placeholder((1, channels, 9, 9), "float32", name="x")
    w = te.placeholder((24, channels, 3, 3), "int8", name="w")
    y = topi.nn.conv2d_nchw(x, weight_dequantize_te(w, "float32"), 1, 1, 1, out_dtype="float32")
    sch = Conv2d(CostModel(spec)).apply(te.create_prim_func([x, w, y]), spec.build_target(), False)
    assert sch is not None and widened_in_kernel(sch.mod["main"]) is True
    stage = sch.get_sblock(DEQUANTIZE_BLOCK)
    # under a reduction chunk of 16 input channels (48), or around the whole (short) reduction (4), in
    # registers; or, where an output-channel block's float weights fit in L1 and the blocks keep every core
    # of this machine busy, once per block into a heap buffer (pinned: the test below)
    region = [int(r.extent) for r in sch.get(stage).writes[0].region]
    if sch.get(stage).writes[0].source.scope() == "global":
        assert region[1:] == [channels, 3, 3]
    else:
        assert sch.get(stage).writes[0].source.scope() == "local"
        assert region[1:] == [min(channels, 16), 3, 3] or region[1] == 1
    rng = np.random.default_rng(0)
    xs = rng.standard_normal((1, channels, 9, 9)).astype("float32")
    ws = rng.integers(-127, 128, (24, channels, 3, 3)).astype("int8")
    want = torch.nn.functional.conv2d(torch.from_numpy(xs), torch.from_numpy(ws.astype("float32")), padding=1)
    got = _run_kernel(sch, [xs, ws], tuple(want.shape))
    np.testing.assert_allclose(got, want.numpy(), rtol=1e-5, atol=1e-5 * float(np.abs(want.numpy()).max()))


def test_matmul_rule_widens_each_int8_panel_once_per_row_group():
    from tvm import te

    from edgediff.kernels.matmul import packed_matmul_te
    from edgediff.schedules import Matmul
    from edgediff.schedules.common import choose_register_tile, widened_in_kernel
    from edgediff.targets import CostModel, load_target

    spec = load_target("host")
    cost = CostModel(spec)
    tile = choose_register_tile(cost, "float32", 1, 64)
    panel = tile.col_vectors * tile.width
    a = te.placeholder((40, 96), "float32", name="a")
    w = te.placeholder((64 // panel, 96, panel), "int8", name="w")
    y = packed_matmul_te(a, w, "float32")
    sch = Matmul(cost).apply(te.create_prim_func([a, w, y]), spec.build_target(), False)
    assert sch is not None and widened_in_kernel(sch.mod["main"]) is True
    rng = np.random.default_rng(0)
    xs = rng.standard_normal((40, 96)).astype("float32")
    ws = rng.integers(-127, 128, (64 // panel, 96, panel)).astype("int8")
    dense = ws.astype("float32").transpose(1, 0, 2).reshape(96, 64)  # [j // P, k, j % P] -> [k, j]
    want = xs.astype(np.float64) @ dense
    got = _run_kernel(sch, [xs, ws], (40, 64))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * float(np.abs(want).max()))


def test_conv2d_rule_widens_a_small_panel_once_per_output_channel_block():
    """A 1x1 conv whose output-channel block's float weights fit in L1: widened once per block (a heap
    buffer per task), shared by all the block's output rows, instead of once per register tile."""
    from tvm import te, topi

    from edgediff.kernels.dequantize import DEQUANTIZE_BLOCK, weight_dequantize_te
    from edgediff.schedules import Conv2d
    from edgediff.schedules.common import choose_register_tile, widened_in_kernel
    from edgediff.targets import CostModel
    from tests.conftest import pinned_host

    spec = pinned_host(cores=2)  # 128 output channels in blocks of at most 16: 8 tasks, enough for 2 cores
    x = te.placeholder((1, 64, 6, 16), "float32", name="x")
    w = te.placeholder((128, 64, 1, 1), "int8", name="w")
    y = topi.nn.conv2d_nchw(x, weight_dequantize_te(w, "float32"), 1, 0, 1, out_dtype="float32")
    sch = Conv2d(CostModel(spec)).apply(te.create_prim_func([x, w, y]), spec.build_target(), False)
    assert sch is not None and widened_in_kernel(sch.mod["main"]) is True
    stage = sch.get_sblock(DEQUANTIZE_BLOCK)
    assert sch.get(stage).writes[0].source.scope() == "global"
    # under the output-channel block loop, above the output rows: each iteration widens the block's
    # rows x 64 weights, which all its output rows and pixel blocks then read
    loops = [sch.get(loop) for loop in sch.get_loops(stage)]
    names = [str(loop.loop_var) for loop in loops]
    assert "ff_0" in names and not any(name.startswith("yy") for name in names), names
    inner = int(np.prod([int(loop.extent) for loop in loops[names.index("ff_0") + 1 :]]))
    rows = choose_register_tile(CostModel(spec), "float32", 128, 16).rows
    assert inner == rows * 64 and 128 // rows >= 4 * spec.compute.cores
    rng = np.random.default_rng(0)
    xs = rng.standard_normal((1, 64, 6, 16)).astype("float32")
    ws = rng.integers(-127, 128, (128, 64, 1, 1)).astype("int8")
    want = torch.nn.functional.conv2d(torch.from_numpy(xs), torch.from_numpy(ws.astype("float32")))
    got = _run_kernel(sch, [xs, ws], tuple(want.shape))
    np.testing.assert_allclose(got, want.numpy(), rtol=1e-5, atol=1e-5 * float(np.abs(want.numpy()).max()))


@pytest.mark.parametrize(
    ("shape", "dtype"), [((64, 32, 3, 3), "float32"), ((40, 64), "float32"), ((16, 96), "float16")]
)
def test_int4_unpack_kernel_equals_the_numpy_dequantization(shape, dtype):
    """The vectorized int4 unpack (w4 weights of whole 32-input groups) writes exactly what
    ``runtime/quantize.py`` dequantizes: the nibble order, the offset and each group's scale."""
    import tvm

    from edgediff.kernels.dequantize import int4_dequantize_fits, int4_dequantize_func
    from edgediff.runtime.quantize import dequantize_int4, quantize_int4
    from tests.precision.helpers import host_target

    assert int4_dequantize_fits(shape)
    weight = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    packed, scale = quantize_int4(weight)
    func = int4_dequantize_func(shape, dtype)
    ex = tvm.compile(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}), host_target())
    out = tvm.runtime.tensor(np.zeros(shape, dtype))
    ex["main"](tvm.runtime.tensor(packed), tvm.runtime.tensor(scale), out)
    np.testing.assert_array_equal(out.numpy(), dequantize_int4(packed, scale, shape).astype(dtype))


def test_small_int4_layers_keep_the_te_unpack():
    from edgediff.kernels.dequantize import int4_dequantize_fits

    assert not int4_dequantize_fits((16, 4, 3, 3), 36)  # 36 inputs: one group under a whole vector
    assert not int4_dequantize_fits((16, 40), 32)  # inputs padded to whole groups
