"""The bfloat16 x bfloat16 -> float32 GEMM kernel (edgediff/kernels/bf16_matmul.py).

The portable path runs here and is checked against a float64 product of the same bfloat16 values. The
AVX512-BF16 build is checked by its assembly (targets named explicitly, not this host's flags): this CI
machine is AVX2-only, so the ``vdpbf16ps`` build runs only where the CPU has AVX512-BF16.
"""

from __future__ import annotations

import re

import ml_dtypes
import numpy as np
import pytest
import tvm

from edgediff.errors import PassError
from edgediff.kernels.bf16_matmul import (
    KERNEL_NAME,
    BF16Tile,
    bf16_matmul_func,
    build_bf16_matmul,
    has_avx512bf16,
    pack_bf16_weight,
)

ZNVER4 = {"kind": "llvm", "mcpu": "znver4"}  # AVX512-BF16
SAPPHIRERAPIDS = {"kind": "llvm", "mcpu": "sapphirerapids"}  # AVX512-BF16
ZNVER3 = {"kind": "llvm", "mcpu": "znver3"}  # AVX2 only
GENERIC = {"kind": "llvm"}  # this host's ISA at its baseline


def _operands(rows: int, depth: int, columns: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    a = rng.standard_normal((rows, depth)).astype(ml_dtypes.bfloat16)
    w = rng.standard_normal((depth, columns)).astype(ml_dtypes.bfloat16)
    bias = rng.standard_normal(columns).astype(np.float32)
    return a, w, bias


def _run(ex, tile: BF16Tile, a, w, bias) -> np.ndarray:
    out = tvm.runtime.tensor(np.zeros((a.shape[0], w.shape[1]), np.float32))
    args = [a, pack_bf16_weight(w, tile.panel), bias]
    ex[KERNEL_NAME](*[tvm.runtime.tensor(x) for x in args], out)
    return out.numpy()


def _reference(a, w, bias) -> np.ndarray:
    return a.astype(np.float64) @ w.astype(np.float64) + bias


@pytest.mark.parametrize(("rows", "depth", "columns"), [(16, 320, 64), (6, 34, 24), (1, 1280, 8)])
def test_portable_kernel_matches_float64(rows, depth, columns):
    """Products of bfloat16 values are exact in float32: only float32 summation rounding remains."""
    mod, uses_dpbf16, tile = build_bf16_matmul(rows, depth, columns, GENERIC)
    assert not uses_dpbf16
    a, w, bias = _operands(rows, depth, columns)
    got = _run(tvm.compile(mod, tvm.target.Target(GENERIC)), tile, a, w, bias)
    want = _reference(a, w, bias)
    # the standard bound of a float32 sum of depth + 1 terms: (depth + 1) * 2^-24 * sum of |terms|
    bound = (depth + 1) * 2.0**-24 * (np.abs(a.astype(np.float64)) @ np.abs(w.astype(np.float64)) + abs(bias))
    assert np.all(np.abs(got - want) <= bound)
    assert np.abs(got - want).max() < 1e-3 * np.abs(want).max()


def test_packing_layout():
    w = np.arange(6 * 32, dtype=np.float32).reshape(6, 32).astype(ml_dtypes.bfloat16)
    packed = pack_bf16_weight(w, 16)
    assert packed.shape == (2, 3, 16, 2)
    # panel p, pair k2, column c, element e holds W[2 * k2 + e, 16 * p + c]
    assert packed[1, 2, 5, 1] == w[5, 21] and packed[0, 1, 3, 0] == w[2, 3]
    odd = pack_bf16_weight(w[:5], 16)  # depth padded to even with zeros
    assert odd.shape == (2, 3, 16, 2) and float(odd[0, 2, 0, 1]) == 0.0
    with pytest.raises(PassError, match="bfloat16"):
        pack_bf16_weight(w.astype(np.float32), 16)


def test_feature_detection_from_target():
    assert has_avx512bf16(ZNVER4) and has_avx512bf16(SAPPHIRERAPIDS)
    assert not has_avx512bf16(ZNVER3)
    assert not has_avx512bf16({"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mcpu": "cortex-a78"})


@pytest.mark.parametrize("target", [ZNVER4, SAPPHIRERAPIDS], ids=["znver4", "sapphirerapids"])
def test_avx512bf16_build_uses_vdpbf16ps(target):
    rows, depth, columns = 16, 256, 128
    mod, uses_dpbf16, tile = build_bf16_matmul(rows, depth, columns, target)
    assert uses_dpbf16 and tile.lanes == 16
    asm = tvm.compile(mod, tvm.target.Target(target)).mod.inspect_source("asm")
    # one vdpbf16ps per accumulator vector per k pair, on zmm registers; the imported helper is inlined
    steps = re.findall(r"vdpbf16ps\s+[^\n]*%zmm\d+, %zmm\d+", asm)
    assert len(steps) >= tile.rows * tile.col_vectors
    assert "edgediff_dpbf16ps" not in asm  # no out-of-line call per step


def test_avx2_build_has_no_vdpbf16ps():
    mod, uses_dpbf16, _ = build_bf16_matmul(8, 64, 64, ZNVER3)
    asm = tvm.compile(mod, tvm.target.Target(ZNVER3)).mod.inspect_source("asm")
    assert not uses_dpbf16 and "vdpbf16ps" not in asm and "vfmadd" in asm


def test_vdpbf16ps_kernel_where_the_cpu_has_it():
    from tests.precision.helpers import host_target

    host = tvm.target.Target(host_target())
    if not has_avx512bf16(host):
        pytest.skip("this CPU lacks AVX512-BF16: the vdpbf16ps build is checked by its assembly only")
    rows, depth, columns = 16, 256, 64
    mod, uses_dpbf16, tile = build_bf16_matmul(rows, depth, columns, host)
    a, w, bias = _operands(rows, depth, columns, seed=1)
    got = _run(tvm.compile(mod, host), tile, a, w, bias)
    np.testing.assert_allclose(got, _reference(a, w, bias), rtol=0, atol=1e-3)


def test_rejects_an_odd_depth_and_a_misfit_tile():
    with pytest.raises(PassError, match="not even"):
        bf16_matmul_func(4, 7, 16, BF16Tile(4, 1, 16), use_dpbf16=True)
    with pytest.raises(PassError, match="16 float32 lanes"):
        bf16_matmul_func(4, 8, 16, BF16Tile(4, 2, 8), use_dpbf16=True)
