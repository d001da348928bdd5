"""The int8 x int8 -> int32 GEMM kernel (edgediff/kernels/int8_matmul.py).

Exactness is checked on this host for the portable instruction step, with both activation encodings (int8,
and uint8 offset by 128 with the weight-sum compensation that vpdpbusd needs), so the loop nest, packing and
epilogue shared by every instruction are checked whatever this CPU has. The vpdpbusd and sdot builds are
checked by what their assembly contains (targets named explicitly, not this host's flags), the sdot build
runs exactly under qemu, and the vpdpbusd build runs only where the host has AVX512-VNNI.
"""

from __future__ import annotations

import re

import numpy as np
import pytest
import tvm

from edgediff.errors import PassError
from edgediff.kernels.int8_matmul import (
    KERNEL_NAME,
    build_int8_matmul,
    choose_int8_tile,
    dot_instruction,
    int8_matmul_func,
    pack_int8_weight,
)
from tests.precision.helpers import (
    A78,
    ARMV8,
    GENERIC,
    ZNVER3,
    ZNVER4,
    host_target,
    portable,
    run_int8_matmul,
)


def _operands(rows: int, depth: int, columns: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    q = rng.integers(-127, 128, (rows, depth)).astype(np.int8)
    q[0, :4] = -127  # the extremes, so that an overflow or a saturating instruction would show
    w = rng.integers(-128, 128, (depth, columns)).astype(np.int8)
    w[:4, 0] = -128
    a_scale = rng.uniform(0.01, 0.1, rows).astype(np.float32)
    w_scale = rng.uniform(0.01, 0.1, columns).astype(np.float32)
    bias = rng.standard_normal(columns).astype(np.float32)
    return q, w, a_scale, w_scale, bias


@pytest.mark.parametrize("activation_dtype", ["int8", "uint8"])
@pytest.mark.parametrize(("rows", "depth", "columns"), [(64, 320, 256), (6, 68, 48), (1, 1280, 64)])
def test_portable_kernel_is_exact(activation_dtype, rows, depth, columns):
    """int32 output equal to numpy's int32 product; uint8 exercises vpdpbusd's offset + compensation."""
    dot = portable(8, activation_dtype)
    tile = choose_int8_tile(dot, rows, columns)
    ex = tvm.compile(tvm.IRModule({KERNEL_NAME: int8_matmul_func(rows, depth, columns, dot, tile)}), GENERIC)
    q, w, *scales = _operands(rows, depth, columns)
    got = run_int8_matmul(ex, dot, tile, q, w, *scales, "int32")
    np.testing.assert_array_equal(got, q.astype(np.int32) @ w.astype(np.int32))


@pytest.mark.parametrize("activation_dtype", ["int8", "uint8"])
def test_portable_kernel_dequantize_epilogue(activation_dtype):
    """float32 output = int32 product x per-row activation scale x per-column weight scale + bias."""
    rows, depth, columns = 16, 96, 64
    dot = portable(8, activation_dtype)
    tile = choose_int8_tile(dot, rows, columns)
    func = int8_matmul_func(rows, depth, columns, dot, tile, epilogue="dequantize", parallel=False)
    ex = tvm.compile(tvm.IRModule({KERNEL_NAME: func}), GENERIC)
    q, w, a_scale, w_scale, bias = _operands(rows, depth, columns, seed=1)
    got = run_int8_matmul(ex, dot, tile, q, w, a_scale, w_scale, bias, "dequantize")
    exact = (q.astype(np.int64) @ w.astype(np.int64)).astype(np.float64)
    expected = exact * a_scale[:, None] * w_scale[None, :] + bias
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-4)


def test_packing_layout_and_compensation():
    w = np.arange(-60, 60, dtype=np.int8).reshape(8, 15)[:, :12].copy()  # K=8, N=12
    packed, comp = pack_int8_weight(w, 4, compensated=True)
    assert packed.shape == (3, 2, 4, 4)
    for jo, ko, p, t in np.ndindex(*packed.shape):
        assert packed[jo, ko, p, t] == w[4 * ko + t, 4 * jo + p]
    np.testing.assert_array_equal(comp, 128 * w.astype(np.int32).sum(axis=0))
    assert pack_int8_weight(w, 4, compensated=False)[1] is None
    padded, _ = pack_int8_weight(w[:6], 4, compensated=False)  # K=6 -> zero rows up to 8
    assert padded.shape == (3, 2, 4, 4) and not padded[:, 1, :, 2:].any()
    with pytest.raises(PassError, match="multiple of the panel"):
        pack_int8_weight(w, 8, compensated=False)


def test_dot_instruction_from_target():
    vnni, avx2, sdot, neon = (dot_instruction(t) for t in (ZNVER4, ZNVER3, A78, ARMV8))
    assert (vnni.name, vnni.lanes, vnni.activation_dtype) == ("avx512-vnni vpdpbusd", 16, "uint8")
    assert vnni.compensated and not sdot.compensated
    assert (sdot.name, sdot.lanes, sdot.activation_dtype) == ("neon sdot", 4, "int8")
    assert avx2.name == "avx2 vpmaddwd" and avx2.intrin is None and not avx2.compensated
    assert neon.name == "portable" and neon.intrin is None
    with pytest.raises(PassError, match="not a CPU"):
        dot_instruction({"kind": "opencl"})


@pytest.mark.parametrize("target", [ZNVER4, A78])
def test_tile_fits_the_register_file(target):
    dot = dot_instruction(target)
    for rows, columns in [(1024, 320), (64, 1280), (16, 5120), (7, 64)]:
        tile = choose_int8_tile(dot, rows, columns)
        assert rows % tile.rows == 0 and columns % tile.panel == 0
        assert tile.rows * tile.col_vectors <= dot.registers * 3 // 4


def _asm(mod, target) -> str:
    return tvm.compile(mod, tvm.target.Target(target)).mod.inspect_source("asm")


def test_vnni_build_uses_vpdpbusd():
    mod, dot, tile = build_int8_matmul(64, 320, 256, ZNVER4, epilogue="dequantize")
    asm = _asm(mod, ZNVER4)
    # one vpdpbusd per accumulator vector per 4 k, on zmm registers; no widening-multiply fallback
    steps = re.findall(r"vpdpbusd\s+%zmm\d+, %zmm\d+, %zmm\d+", asm)
    assert len(steps) >= tile.rows * tile.col_vectors
    assert "vpmulld" not in asm and "vpmaddubsw" not in asm


def test_vnni_kernel_exact_where_the_cpu_has_it():
    from tvm.target import codegen

    host = tvm.target.Target(host_target())
    if not codegen.target_has_features(["avx512vnni", "avx512bw"], host):
        pytest.skip("this CPU lacks AVX512-VNNI: the vpdpbusd build is checked by its assembly only")
    rows, depth, columns = 32, 256, 128
    mod, dot, tile = build_int8_matmul(rows, depth, columns, ZNVER4)
    q, w, *scales = _operands(rows, depth, columns)
    got = run_int8_matmul(tvm.compile(mod, ZNVER4), dot, tile, q, w, *scales, "int32")
    np.testing.assert_array_equal(got, q.astype(np.int32) @ w.astype(np.int32))


def test_avx2_build_uses_vpmaddwd_and_is_exact():
    """x86 without VNNI: two vpmaddwd per 4-byte step on sign-extended int16 halves, exact."""
    rows, depth, columns = 24, 200, 64
    mod, dot, tile = build_int8_matmul(rows, depth, columns, ZNVER3)
    asm = _asm(mod, ZNVER3)
    assert len(re.findall(r"vpmaddwd\s+%ymm", asm)) >= 2 * tile.rows * tile.col_vectors
    assert "vpmulld" not in asm
    from tvm.target import codegen

    host = tvm.target.Target(host_target())
    if not codegen.target_has_features("avx2", host):
        pytest.skip("this CPU lacks AVX2: the vpmaddwd build is checked by its assembly only")
    q, w, *scales = _operands(rows, depth, columns, seed=3)
    got = run_int8_matmul(tvm.compile(mod, ZNVER3), dot, tile, q, w, *scales, "int32")
    np.testing.assert_array_equal(got, q.astype(np.int32) @ w.astype(np.int32))


def test_sdot_build_uses_sdot():
    mod, dot, tile = build_int8_matmul(64, 320, 256, A78, epilogue="dequantize")
    asm = _asm(mod, A78)
    steps = re.findall(r"sdot\s+v\d+\.4s, v\d+\.16b, v\d+\.16b", asm)
    assert len(steps) >= tile.rows * tile.col_vectors
    assert dot.name == "neon sdot"


def test_rejects_a_depth_that_is_not_a_multiple_of_four():
    with pytest.raises(PassError, match="multiple of 4"):
        int8_matmul_func(4, 6, 16, portable(8, "int8"))


@pytest.mark.parametrize("out_dtype", ["int8", "uint8"])
def test_row_quantize_kernel_matches_the_relax_quantizer(out_dtype):
    """The one-kernel dynamic per-token quantizer (kernels/int8_linear.py) gives the int8 rows and scales of
    the formula the Relax rewrite and the torch fake-quant use, bit for bit (round half to even), including
    an all-zero row (scale MIN_SCALE) and the uint8 + 128 encoding of vpdpbusd."""
    from edgediff.kernels.int8_linear import quantize_rows_func
    from edgediff.runtime.quantize import MIN_SCALE

    rows, depth = 6, 40
    rng = np.random.default_rng(3)
    x = (rng.standard_normal((rows, depth)) * rng.uniform(0.1, 10, (rows, 1))).astype(np.float32)
    x[1] = 0.0
    x[2, :3] = [-4.0, 4.0, 2.0]  # the peak, and values at (or an ulp from) a tie: 63.5 steps
    x[2, 3:] = 0.0
    x[2, 3] = 4.0 * 63.5 / 127.0
    func = quantize_rows_func(rows, depth, "float32", out_dtype, "quantize_rows")
    ex = tvm.compile(tvm.IRModule({"quantize_rows": func}), tvm.target.Target(GENERIC))
    dev = tvm.cpu()
    q = tvm.runtime.tensor(np.zeros((rows, depth), out_dtype), dev)
    scale = tvm.runtime.tensor(np.zeros(rows, np.float32), dev)
    ex["quantize_rows"](tvm.runtime.tensor(x, dev), q, scale)
    want_scale = np.maximum(np.abs(x).max(axis=1) / np.float32(127), np.float32(MIN_SCALE)).astype(np.float32)
    want = np.clip(np.rint(x / want_scale[:, None]), -128, 127)
    np.testing.assert_array_equal(scale.numpy(), want_scale)
    offset = 128 if out_dtype == "uint8" else 0
    np.testing.assert_array_equal(q.numpy().astype(np.int32), want.astype(np.int32) + offset)
    assert want[2, 3] == 64 and q.numpy()[2, 3] == 64 + offset
